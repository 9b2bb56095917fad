"""The ``hf`` backend's batch: many sequences in one forward, each with its own adapter set.

How a step goes (engine/serve/batch.py has the contract):

- Sequences live in *lanes*. A lane is the rows of one batched KV cache (transformers'
  ``DynamicCache``) that decode in one forward. The *mixed* lane holds every sequence whose
  set is the base alone or one plain LoRA at scale 1, each row with its own adapter: the
  loaded adapters stacked in each layer, one pass for all rows
  (engine/serve/backends/lora_rows.py), else PEFT's per-row ``adapter_names`` (one per row;
  ``__base__`` for none) for adapters that do not stack. A blend, a scaled adapter or a DoRA
  adapter (PEFT cannot mix those per row) gets a lane of its own per distinct set, with the
  set made active before that lane's forward; lanes take turns.
- A newcomer reads its prompt alone (batch of one, its own cache), ``prefill_chunk`` tokens
  per step, while the lanes decode; its first token comes from its last chunk. Its cache is
  then spliced into its lane: rows are *left-padded* to a shared length (the 2-D attention
  mask has zeros over the padding, and each row's ``position_ids`` count only its own
  tokens), as transformers' own batched generation pads them.
- A sequence that ends (EOS, a stop string, its budget, the client gone) leaves its lane:
  its row is removed (``batch_select_indices``) and columns nobody needs any more are cut.

Same answer alone or in company: a sequence's prompt is always read alone in the same
chunks, its sampler is its own (``torch.Generator`` from its seed), and padding is masked
out, so company changes only the order of floating-point sums in a forward. In float64 the
greedy tokens are identical (tests/test_serve_batch.py); in float32 a near-tie can differ.

Why the cache tensors are touched directly (``layer.keys``/``layer.values``): transformers
offers left-padded batches but no call to add a row to a running one. Only plain
``DynamicLayer`` caches are joined; any other layer kind (sliding windows ...) runs each
sequence in a lane of its own, unbatched but correct, with one notice.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from engine.errors import UserError
from engine.serve.backend import AdapterScale, GenerateRequest, Piece, check_ids
from engine.serve.backends.lora_rows import BASE, Stacks, input_embedding

log = logging.getLogger("engine.serve")

MIXED = ("mixed",)
"""The lane of the base and single plain LoRA adapters at scale 1 (PEFT's per-row adapters)."""


class StopText:
    """Turns the growing decoded text into safe pieces: nothing past a stop string is emitted,
    and a tail that could still become one (``"<|"`` of ``"<|end|>"``) is held back."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = tuple(s for s in stops if s)
        self.sent = 0

    def push(self, text: str) -> tuple[str, bool]:
        """(new text safe to send, whether a stop string was reached)."""
        hits = [i for i in (text.find(s, self.sent) for s in self.stops) if i >= 0]
        if hits:
            out = text[self.sent : min(hits)]
            self.sent = min(hits)
            return out, True
        # k never past the text: a 100 kB stop string costs what the text does, not its square.
        most = len(text) - self.sent
        hold = max((k for s in self.stops for k in range(1, min(len(s), most + 1)) if text.endswith(s[:k])), default=0)
        end = max(self.sent, len(text) - hold)
        out, self.sent = text[self.sent : end], end
        return out, False

    def rest(self, text: str) -> str:
        """At the end of generation: the held-back tail (it never became a stop string)."""
        out, self.sent = text[self.sent :], len(text)
        return out


@dataclass
class Seq:
    """One request in the batch: what it has read, made and sent, and how it samples."""

    request: GenerateRequest
    how: tuple
    """How its adapters apply: ``MIXED`` or ``("set", ((name, scale), ...))``."""
    budget: int
    gen: object
    """Its ``torch.Generator``, seeded from the request (or at random)."""
    read: int = 0
    """Prompt tokens read so far (the prompt is done when ``read == len(prompt_ids)``)."""
    cache: object = None
    """Its own cache while it reads its prompt; None once spliced into its lane."""
    lane: tuple | None = None
    """The key of the lane it joined (None while it reads its prompt)."""
    last: int | None = None
    """The token to feed at its next decode step."""
    ids: list[int] = field(default_factory=list)
    sent_ids: int = 0
    text: str = ""
    stop: StopText | None = None


@dataclass
class Lane:
    """Rows of one batched cache: ``slots[i]`` is row i; ``mask[i]`` marks its real columns."""

    how: tuple
    """How the adapters of its rows apply (``Seq.how``): every row of a lane shares it."""
    slots: list[int] = field(default_factory=list)
    cache: object = None
    mask: object = None
    positions: list[int] = field(default_factory=list)


class HfBatch:
    """Up to ``size`` sequences over one ``HfBackend`` (its model, tokenizer and adapters)."""

    def __init__(self, backend, *, size: int, prefill_chunk: int):
        self.backend, self.size, self.chunk = backend, size, prefill_chunk
        self.seqs: dict[int, Seq] = {}
        self.lanes: dict[tuple, Lane] = {}
        self._next = 0
        self._scaled = False
        """Whether a blend lane changed adapter scales since the mixed lane last ran."""
        self._joinable: bool | None = None
        self._stacks = Stacks()
        """The mixed lane's per-row LoRA (engine/serve/backends/lora_rows.py), rebuilt after a load."""

    # --- the contract ---------------------------------------------------------------------

    def add(self, request: GenerateRequest) -> int:
        import torch

        backend = self.backend
        if not request.prompt_ids:
            raise UserError("the prompt is empty")
        check_ids(request.prompt_ids, input_embedding(backend.base).num_embeddings)
        how = self._how(request.adapters)
        gen = torch.Generator("cpu")
        # torch takes 64 bits: OpenAI's int64 seeds (negative ones too) map one to one.
        seed = request.seed if request.seed is not None else int.from_bytes(os.urandom(8), "little")
        gen.manual_seed(seed & 0xFFFF_FFFF_FFFF_FFFF)
        budget = min(request.max_tokens, backend.context_length - len(request.prompt_ids))
        slot, self._next = self._next, self._next + 1
        self.seqs[slot] = Seq(request, how, budget, gen, stop=StopText(request.stop))
        return slot

    def step(self) -> dict[int, Piece | BaseException]:
        import torch

        out: dict[int, Piece | BaseException] = {}
        with torch.inference_mode():
            for key in list(self.lanes):
                self._decode(key, out)
            for slot, seq in list(self.seqs.items()):
                if seq.lane is None:
                    self._read_prompt(slot, seq, out)
        for slot, item in out.items():
            if isinstance(item, BaseException) or item.finish_reason:
                self.drop(slot)
        return out

    def drop(self, slot: int) -> None:
        seq = self.seqs.pop(slot, None)
        if seq is None or seq.lane is None:
            return  # unknown, or never joined a lane
        lane = self.lanes[seq.lane]
        row = lane.slots.index(slot)
        keep = [i for i in range(len(lane.slots)) if i != row]
        if not keep:
            del self.lanes[seq.lane]
            return
        lane.slots.pop(row)
        lane.positions.pop(row)
        lane.cache.batch_select_indices(keep)
        lane.mask = lane.mask[keep]
        dead = int((lane.mask.sum(0) == 0).long().cumprod(0).sum())  # leading columns nobody attends to
        if dead:
            _cut_front(lane.cache, dead)
            lane.mask = lane.mask[:, dead:]

    def live(self) -> list[int]:
        return list(self.seqs)

    # --- lanes and adapters -----------------------------------------------------------------

    def _how(self, adapters: tuple[AdapterScale, ...]) -> tuple:
        """How a request's set applies, hence its lane (unknown adapters refused here, before it is added)."""
        backend = self.backend
        unknown = [a.name for a in adapters if a.name not in backend._internal]
        if unknown:
            raise UserError(f"adapter {unknown[0]!r} is not loaded")
        if not adapters or backend.peft is None:
            return MIXED
        if len(adapters) == 1 and adapters[0].scale == 1.0 and backend.mixable(adapters[0].name):
            return MIXED
        return ("set", tuple((a.name, float(a.scale)) for a in adapters))

    def _mixable(self) -> list[str]:
        """PEFT's names of the loaded adapters the mixed lane can hold (the stacks' key: a load changes it)."""
        backend = self.backend
        return [internal for name, internal in backend._internal.items() if backend.mixable(name)]

    def _forward(self, how: tuple, input_ids, *, rows: list[Seq], **kw):
        """The model's forward for these rows, their adapters applied as ``how`` says."""
        backend = self.backend
        model = backend.peft or backend.base
        if backend.peft is None:
            return model(input_ids=input_ids, use_cache=True, logits_to_keep=1, **kw)
        from engine.adapter import set_scales

        if how == MIXED:
            if self._scaled:  # a blend lane scaled some adapters: back to as trained (what the stacks fold in)
                set_scales(backend.peft, dict.fromkeys(backend._internal.values(), 1.0))
                self._scaled = False
            names = [backend._internal[s.request.adapters[0].name] if s.request.adapters else BASE for s in rows]
            stacks = self._stacks.get(backend.peft, self._mixable()) if set(names) != {BASE} else None
            if stacks is None or not stacks.covers(names):
                return model(input_ids=input_ids, use_cache=True, logits_to_keep=1, adapter_names=names, **kw)
            with stacks.applied(names) as base_rows:
                return model(input_ids=input_ids, use_cache=True, logits_to_keep=1, adapter_names=base_rows, **kw)
        names = [backend._internal[name] for name, _ in how[1]]
        backend.peft.base_model.set_adapter(names, inference_mode=True)
        set_scales(backend.peft, {backend._internal[name]: scale for name, scale in how[1]})
        self._scaled = True
        return model(input_ids=input_ids, use_cache=True, logits_to_keep=1, **kw)

    # --- reading a prompt, decoding a lane ---------------------------------------------------

    def _read_prompt(self, slot: int, seq: Seq, out: dict) -> None:
        """One chunk of the prompt, alone; after the last one, its first token and a row in its lane."""
        import torch

        if seq.budget <= 0:
            out[slot] = Piece("", [], finish_reason="length")
            return
        prompt = seq.request.prompt_ids
        chunk = prompt[seq.read : seq.read + self.chunk]
        if seq.cache is None:
            from transformers import DynamicCache

            seq.cache = DynamicCache()
        ids = torch.tensor([chunk], device=self.backend.device)
        result = self._forward(seq.how, ids, rows=[seq], cache=seq.cache)
        seq.read += len(chunk)
        if seq.read < len(prompt):
            return
        self._emit(slot, seq, result.logits[0, -1], out)
        if slot not in out or out[slot].finish_reason is None:
            self._join(slot, seq)

    def _join(self, slot: int, seq: Seq) -> None:
        """Splice a read prompt's cache into its lane as a new row (left-padded to the lane's length)."""
        import torch

        cache, seq.cache = seq.cache, None
        n = cache.get_seq_length()
        mask = torch.ones((1, n), dtype=torch.long, device=self.backend.device)
        seq.lane = seq.how if self._can_join(cache) else (*seq.how, slot)  # not joinable: a lane each
        lane = self.lanes.get(seq.lane)
        if lane is None:
            self.lanes[seq.lane] = Lane(seq.how, [slot], cache, mask, [n])
            return
        width = lane.mask.shape[1]
        if n < width:
            _pad_front(cache, width - n)
            mask = torch.cat([mask.new_zeros((1, width - n)), mask], dim=1)
        elif n > width:
            _pad_front(lane.cache, n - width)
            lane.mask = torch.cat([lane.mask.new_zeros((lane.mask.shape[0], n - width)), lane.mask], dim=1)
        _stack(lane.cache, cache)
        lane.mask = torch.cat([lane.mask, mask], dim=0)
        lane.slots.append(slot)
        lane.positions.append(n)

    def _decode(self, key: tuple, out: dict) -> None:
        """One token for every row of a lane, in one forward."""
        import torch

        lane = self.lanes[key]
        rows = [self.seqs[s] for s in lane.slots]
        device = self.backend.device
        ids = torch.tensor([[s.last] for s in rows], device=device)
        mask = torch.cat([lane.mask, lane.mask.new_ones((len(rows), 1))], dim=1)
        positions = torch.tensor([[p] for p in lane.positions], device=device)
        result = self._forward(lane.how, ids, rows=rows, cache=lane.cache, attention_mask=mask, position_ids=positions)
        lane.mask = mask
        lane.positions = [p + 1 for p in lane.positions]
        for i, slot in enumerate(list(lane.slots)):
            self._emit(slot, self.seqs[slot], result.logits[i, -1], out)

    def _emit(self, slot: int, seq: Seq, logits, out: dict) -> None:
        """Its next token picked, decoded and checked against EOS, stop strings and its budget."""
        try:
            token = _pick(logits, seq.request.temperature, seq.request.top_p, seq.gen)
        except UserError as e:
            out[slot] = e
            return
        backend = self.backend
        if token in backend.eos:
            out[slot] = Piece(seq.stop.rest(seq.text), seq.ids[seq.sent_ids :], finish_reason="stop")
            return
        seq.ids.append(token)
        seq.text = backend.tokenizer.decode(seq.ids, skip_special_tokens=True)
        piece, stopped = seq.stop.push(_complete(seq.text))
        new, seq.sent_ids = seq.ids[seq.sent_ids :], len(seq.ids)
        if stopped:
            out[slot] = Piece(piece, new, finish_reason="stop")
        elif len(seq.ids) >= seq.budget:
            out[slot] = Piece(piece + seq.stop.rest(seq.text), new, finish_reason="length")
        else:
            # One piece per token, empty while text is held back: the app sees every token
            # (a closed stream stops here at once) and counts them for ``usage``.
            out[slot] = Piece(piece, new)
            seq.last = token

    def _can_join(self, cache) -> bool:
        """Whether this model's cache layers are plain ``DynamicLayer`` s (see the module doc); once."""
        if self._joinable is None:
            from transformers.cache_utils import DynamicLayer

            self._joinable = all(type(layer) is DynamicLayer for layer in cache.layers)
            if not self._joinable:
                log.info("serve: this model's cache is not a plain dynamic one; sequences decode one lane each")
        return self._joinable


def _pick(logits, temperature: float, top_p: float, gen) -> int:
    """Greedy at temperature 0; else a sample from the top-p nucleus of the tempered softmax.

    In float64, with the best logit subtracted before dividing by the temperature: a
    temperature of 1e-300 then gives -inf to every other token (greedy in effect) instead of
    inf/inf = NaN, and the nucleus always keeps its first token, even for a top_p of 1e-300
    (which float32 rounds to 0). Scores that are NaN or inf (an adapter scaled far beyond its
    training) are the request's to fix, so a ``UserError``.
    """
    import torch

    scores = logits.double().cpu()
    if not bool(torch.isfinite(scores).all()):
        raise UserError(
            "the model's next-token scores are not finite (NaN or inf) with this adapter set; "
            "lower the adapter scales (POST /lora-adapters) or send the request to the base model"
        )
    if temperature == 0:
        return int(scores.argmax())
    probs = torch.softmax((scores - scores.max()) / temperature, dim=-1)
    if top_p < 1:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < top_p  # the smallest prefix reaching top_p ...
        keep[0] = True  # ... and at least one token
        sorted_p[~keep] = 0
        return int(order[torch.multinomial(sorted_p, 1, generator=gen)])
    return int(torch.multinomial(probs, 1, generator=gen))


def _complete(text: str) -> str:
    """The text without a trailing incomplete UTF-8 sequence (decoded as up to 3 U+FFFD), which
    the next token may complete; longer runs of U+FFFD are the model's own and go out."""
    tail = len(text) - len(text.rstrip("\ufffd"))
    return text[: len(text) - min(tail, 3)]


# --- the cache's tensors (see the module doc for why they are touched) ------------------------


def _pad_front(cache, n: int) -> None:
    """``n`` zero columns before every row (masked out by the caller)."""
    import torch

    for layer in cache.layers:
        for name in ("keys", "values"):
            t = getattr(layer, name)
            pad = t.new_zeros((*t.shape[:2], n, t.shape[3]))
            setattr(layer, name, torch.cat([pad, t], dim=2))


def _cut_front(cache, n: int) -> None:
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys[:, :, n:], layer.values[:, :, n:]


def _stack(cache, other) -> None:
    """``other``'s rows after ``cache``'s (the same length by now)."""
    import torch

    for mine, theirs in zip(cache.layers, other.layers, strict=True):
        mine.keys = torch.cat([mine.keys, theirs.keys], dim=0)
        mine.values = torch.cat([mine.values, theirs.values], dim=0)
