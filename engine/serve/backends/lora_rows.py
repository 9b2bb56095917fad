"""Per-row LoRA for the hf batch's mixed lane: every row's own adapter in one pass per layer.

Why not PEFT's ``adapter_names`` alone: for each LoRA layer it loops over the distinct adapters
of the batch (pick their rows, ``lora_A``, ``lora_B``, scale, write back), so 8 rows on 4
adapters are ~840 small ops a step on SmolLM2-135M, bound by Python overhead, not by the
arithmetic (144 ms a step against 71 ms for 8 rows on the base).

Here each LoRA-wrapped ``nn.Linear`` holds the supported loaded adapters concatenated along the
rank: ``a`` is every adapter's ``lora_A`` weight stacked, [R, in], ``bt`` every ``lora_B``
weight times its scaling, [out, R] (R: the sum of their ranks). A forward computes
``h = x a^T`` for all adapters at once, zeroes in each row the columns that are not its
adapter's (a 0/1 mask from the row's adapter; a base row and an adapter that does not target
the layer own no column), and adds ``h bt^T``: two matmuls and a multiply per layer whatever
the mix. The extra arithmetic, rows x R x (in + out), is small next to the layer's own; the
price is reading every stacked adapter's weights each step (hence ``MOST``).

How it is applied, through PEFT's public API only: the forward runs with every row on
``"__base__"`` (PEFT's per-row API; its LoRA layers then return their base layer's output)
and a forward hook on each LoRA layer's base layer adds the rows' deltas; the hooks are
removed after the forward. PEFT's state is the truth (``lora_A[name].weight``,
``lora_B[name].weight``, ``scaling[name]``), read when the stacks are built; ``Stacks``
keeps them until the loaded set changes. Dropout is left out: serving runs in eval mode,
where PEFT's is the identity too.

What is not stacked runs through PEFT's loop (``adapter_names``), with one notice per adapter:
LoRA on anything but an ``nn.Linear`` (embeddings, convolutions), a LoRA bias,
``fan_in_fan_out``, variants (DoRA ...), ``modules_to_save`` or trainable tokens, beyond
``MOST`` adapters; and, since the stacks read PEFT's attributes, any adapter whose logits
through them differ from PEFT's own on a short input (checked each time they are built: two
small forwards, under a second on SmolLM2) or whose stacks fail to build. A step with one such
row is PEFT's.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

log = logging.getLogger("engine.serve")

BASE = "__base__"
"""PEFT's per-row name for "no adapter"."""

MOST = 16
"""The most adapters stacked: each step reads all of their weights, PEFT's loop only those in
use, so with many loaded the stacks would cost more than they save."""


@dataclass
class _Layer:
    """One LoRA-wrapped Linear's stacks (see the module doc)."""

    base: object
    """The base ``nn.Linear`` the hook goes on."""
    a: object
    """[R, in]: the stacked adapters' ``lora_A`` weights."""
    bt: object
    """[out, R]: their ``lora_B`` weights, each times its scaling."""
    owner: int
    """Index of this layer's column owners in ``RowLora.owners`` (layers alike share one)."""


class RowLora:
    """The stacks of some adapters over every LoRA layer of one PEFT model, and their hooks."""

    def __init__(self, peft, names: list[str]):
        import torch

        self.slots = {name: i for i, name in enumerate(names)}
        self.layers: list[_Layer] = []
        owners: dict[tuple, int] = {}
        for module in _lora_layers(peft):
            mine = [n for n in names if n in module.lora_A]
            if not mine:
                continue
            a = torch.cat([module.lora_A[n].weight for n in mine])
            bt = torch.cat([module.lora_B[n].weight * module.scaling[n] for n in mine], dim=1)
            cols = tuple(self.slots[n] for n in mine for _ in range(module.lora_A[n].weight.shape[0]))
            owner = owners.setdefault(cols, len(owners))
            self.layers.append(_Layer(module.get_base_layer(), a, bt, owner))
        self.owners = [(torch.tensor(cols, device=_device(self)), frozenset(cols)) for cols in owners]
        """Per distinct column layout: each column's adapter slot, and the set of those slots."""

    def covers(self, names: list[str]) -> bool:
        """Whether every row's adapter is stacked (or the base)."""
        return all(n == BASE or n in self.slots for n in names)

    @contextmanager
    def applied(self, names: list[str]) -> Iterator[list[str]]:
        """Hooks adding each row's delta (row i on adapter ``names[i]``) for one forward;
        yields the ``adapter_names`` that forward takes (every row on the base)."""
        import torch

        rows = torch.tensor([self.slots.get(n, -1) for n in names], device=_device(self))
        used = {self.slots[n] for n in names if n != BASE}
        dtype = self.layers[0].a.dtype if self.layers else None
        masks = [(rows[:, None] == cols[None, :]).to(dtype)[:, None, :] if used & slots else None for cols, slots in self.owners]
        handles = [
            layer.base.register_forward_hook(_adder(layer, masks[layer.owner]))
            for layer in self.layers
            if masks[layer.owner] is not None
        ]
        try:
            yield [BASE] * len(names)
        finally:
            for handle in handles:
                handle.remove()


def _adder(layer: _Layer, mask):
    """The forward hook adding ``layer``'s per-row deltas; ``mask`` is [rows, 1, R]."""
    import torch.nn.functional as F

    def hook(_module, args, output):
        x = args[0]
        m = mask if x.dim() == 3 else mask.view(mask.shape[0], *([1] * (x.dim() - 2)), mask.shape[-1])
        h = F.linear(x.to(layer.a.dtype), layer.a).mul_(m.to(layer.a.dtype))
        if output.dtype != h.dtype or not output.is_contiguous():
            return output + F.linear(h, layer.bt).to(output.dtype)
        # In place, one fused kernel: the base layer's fresh output, which its backward never reads.
        output.view(-1, output.shape[-1]).addmm_(h.view(-1, h.shape[-1]), layer.bt.t())
        return output

    return hook


def _device(stacks: RowLora):
    return stacks.layers[0].a.device if stacks.layers else "cpu"


def input_embedding(model):
    """The model's input embedding: under PEFT's wrapper when an adapter targets it, which has
    no ``num_embeddings`` of its own."""
    embed = model.get_input_embeddings()
    return embed.get_base_layer() if hasattr(embed, "get_base_layer") else embed


def _lora_layers(peft) -> list:
    from peft.tuners.lora import LoraLayer

    return [m for m in peft.modules() if isinstance(m, LoraLayer)]


# --- which adapters stack, built and checked once per loaded set -------------------------


def unsupported(peft, name: str) -> str | None:
    """Why adapter ``name`` cannot be stacked (None: it can), from its config and its layers."""
    import torch
    from peft.tuners.lora import Linear

    config = peft.peft_config[name]
    if getattr(config, "modules_to_save", None) or getattr(config, "trainable_token_indices", None):
        return "it trains whole modules or tokens (modules_to_save)"
    for module in _lora_layers(peft):
        if not any(name in getattr(module, attr, {}) for attr in module.adapter_layer_names):
            continue
        if not isinstance(module, Linear) or not isinstance(module.get_base_layer(), torch.nn.Linear):
            return f"it adapts {type(module.get_base_layer()).__name__} layers, not only Linear ones"
        if getattr(module, "fan_in_fan_out", False):
            return "fan_in_fan_out"
        if module.lora_bias.get(name) or module.lora_B[name].bias is not None:
            return "it has a LoRA bias"
        if name in getattr(module, "lora_variant", {}) or module.use_dora.get(name):
            return "it is a LoRA variant (DoRA ...)"
    return None


class Stacks:
    """The ``RowLora`` of the adapters loaded now: rebuilt (and checked) when that set changes.

    The key is each adapter's name and config object (a load adds one; an unload and a new
    load under the same name bring another config). The PEFT model is held weakly: once the
    backend lets it go, the stacks go with it.
    """

    def __init__(self):
        self._peft = None
        self._key: tuple | None = None
        self._pinned: list = []
        """The configs the key's ids refer to, kept alive so that no new one reuses an id."""
        self._stacks: RowLora | None = None
        self._told: set[tuple[str, str]] = set()

    def get(self, peft, names: list[str]) -> RowLora | None:
        """The stacks over ``names`` (PEFT's names of the mixable loaded adapters), less those
        that do not stack; None when none does."""
        import weakref

        key = tuple((n, id(peft.peft_config[n])) for n in names)
        if self._peft is None or self._peft() is not peft or key != self._key:
            self._forget()
            self._stacks = self._build(peft, names)
            self._peft = weakref.ref(peft, self._forget)
            self._key, self._pinned = key, [peft.peft_config[n] for n in names]
        return self._stacks

    def _forget(self, _ref=None) -> None:
        self._peft, self._key, self._pinned, self._stacks = None, None, [], None

    def _build(self, peft, names: list[str]) -> RowLora | None:
        ok = []
        for name in names:
            reason = unsupported(peft, name)
            if reason is None and len(ok) == MOST:
                reason = f"more than {MOST} adapters are loaded (the stacks would read every one each step)"
            if reason:
                self._tell(name, reason)
            else:
                ok.append(name)
        while ok:
            try:
                stacks = RowLora(peft, ok)
                wrong = _disagree(peft, stacks, ok)
            except Exception as e:  # noqa: BLE001 - a speed-up steps aside; the run goes on through PEFT
                for name in ok:
                    self._tell(name, f"the stacks could not be built or run ({type(e).__name__}: {e})")
                return None
            if not wrong:
                return stacks
            for name in wrong:
                self._tell(name, "its logits through the stacks differ from PEFT's own")
            ok = [n for n in ok if n not in wrong]
        return None

    def _tell(self, name: str, reason: str) -> None:
        if (name, reason) not in self._told:
            self._told.add((name, reason))
            log.info("serve: adapter %s runs through PEFT's per-adapter loop in mixed batches: %s", name, reason)


def _disagree(peft, stacks: RowLora, names: list[str]) -> list[str]:
    """The adapters whose logits through ``stacks`` differ from PEFT's ``adapter_names`` path
    on a short input (a row per adapter and a base row). Beyond rounding means beyond 1% of
    the adapter's own effect on the logits plus 64 ulps of their largest; a base row beyond
    rounding fails them all."""
    import torch

    rows = [*names, BASE]
    embed = input_embedding(peft)
    ids = torch.arange(1, 5, device=embed.weight.device).remainder(embed.num_embeddings).repeat(len(rows), 1)
    with torch.inference_mode():
        want = peft(input_ids=ids, adapter_names=rows, use_cache=False).logits
        with stacks.applied(rows) as base_rows:
            got = peft(input_ids=ids, adapter_names=base_rows, use_cache=False).logits
    ulps = 64 * torch.finfo(want.dtype).eps
    got, want = got.double(), want.double()
    err = (got - want).flatten(1).abs().amax(1)
    effect = (want - want[-1]).flatten(1).abs().amax(1)
    ok = err <= 0.01 * effect + ulps * want.flatten(1).abs().amax(1)
    if not bool(ok[-1]):
        return list(names)
    return [name for name, fine in zip(names, ok.tolist()[:-1], strict=True) if not fine]
