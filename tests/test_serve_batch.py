"""Continuous batching on the hf backend: each request's answer in company is its answer alone.

The reference is the request run alone through the same backend (``generate``), which is
also today's serial server. Requests differ in prompt length, budget, stop strings, seeds,
temperature and adapter set (base, plain adapters of different ranks and layers, a blend, a
scaled adapter, a DoRA adapter), join at different steps, and one leaves mid-batch. The mixed
lane's stacked per-row LoRA (engine/serve/backends/lora_rows.py) is held to PEFT's own per-row
path in float64, and steps aside for what it does not stack.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import save_adapter


def _save_dora(dest: Path) -> Path:
    return save_adapter(dest, 5, r=4, lora_alpha=32, target_modules=["q_proj", "v_proj"], use_dora=True)


def _save_wide(dest: Path) -> Path:
    """Another rank and other layers than ``save_adapter``'s (r=4 on q, v, o, down)."""
    return save_adapter(dest, 3, r=8, lora_alpha=24, target_modules=["k_proj", "gate_proj", "up_proj", "v_proj"])


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    from engine.model import HfSpec as ModelSpec
    from engine.model import TinySpec, build_tiny
    from engine.serve.backends.hf import HfSpec, load_hf

    root = tmp_path_factory.mktemp("batch")
    model, tokenizer = build_tiny(TinySpec(kind="tiny"))
    model.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    adapters = {
        "a": save_adapter(root / "a", seed=1),
        "b": save_adapter(root / "b", seed=2),
        "d": _save_dora(root / "d"),
        "w": _save_wide(root / "w"),
    }
    spec = HfSpec(kind="hf", device="cpu", context_length=160, max_batch=8, prefill_chunk=6)
    backend = load_hf(spec, model_spec=ModelSpec(kind="hf", name_or_path=str(root / "base")), adapter_paths=adapters)
    yield backend
    backend.close()


def requests(backend) -> list:
    from engine.serve.backend import AdapterScale as A
    from engine.serve.backend import GenerateRequest

    sets = [(), (A("a"),), (A("b"),), (A("a", 0.5), A("b", 0.5)), (A("a"),), (A("d"),), (A("b", 2.0),), (A("w"),)]
    out = []
    for i, adapters in enumerate(sets):
        prompt = backend.tokenizer(f"request {i}: " + "the quick brown fox " * (i + 1)).input_ids
        sampled = i % 3 == 1
        stop = ("e",) if i == 4 else ()
        out.append(
            GenerateRequest(prompt, 6 + 3 * i, temperature=0.9 if sampled else 0, top_p=0.9, seed=i, stop=stop, adapters=adapters)
        )
    return out


def alone(backend, request) -> tuple[list[int], str, str | None]:
    pieces = list(backend.generate(request))
    return [t for p in pieces for t in p.token_ids], "".join(p.text for p in pieces), pieces[-1].finish_reason


def run_batch(batch, reqs, *, join_every: int = 2, leave: dict[int, int] | None = None):
    """Add one request every ``join_every`` steps; drop request i after ``leave[i]`` of its pieces."""
    pending, slots, got, steps = list(enumerate(reqs)), {}, {}, 0
    leave = leave or {}
    while pending or batch.seqs:
        if pending and steps % join_every == 0:
            i, r = pending.pop(0)
            slots[batch.add(r)] = i
            got[i] = {"ids": [], "text": "", "finish": None, "pieces": 0}
        for slot, piece in batch.step().items():
            assert not isinstance(piece, BaseException), piece
            g = got[slots[slot]]
            g["ids"] += piece.token_ids
            g["text"] += piece.text
            g["finish"], g["pieces"] = piece.finish_reason, g["pieces"] + 1
            if leave.get(slots[slot]) == g["pieces"] and not piece.finish_reason:
                batch.drop(slot)
        steps += 1
    return got, steps


def test_every_request_in_a_batch_gets_exactly_its_answer_alone(backend):
    reqs = requests(backend)
    solo = [alone(backend, r) for r in reqs]
    assert len({tuple(ids) for ids, _, _ in solo}) == len(reqs), "the requests should not all answer alike"
    assert solo[4][2] == "stop" and "e" not in solo[4][1]  # the stop string ended it
    got, steps = run_batch(backend.batch, reqs)
    for i, (ids, text, finish) in enumerate(solo):
        assert (got[i]["ids"], got[i]["text"], got[i]["finish"]) == (ids, text, finish), f"request {i}"
    assert steps < sum(len(ids) for ids, _, _ in solo), "the batch should take fewer steps than one at a time"
    assert backend.batch.seqs == {} and backend.batch.lanes == {}
    stacks = backend.batch._stacks.get(backend.peft, backend.batch._mixable())
    assert stacks.covers([backend._internal[n] for n in "abw"]), "the mixed lane ran on the stacks, not PEFT's loop"


def test_a_request_leaving_mid_batch_does_not_disturb_the_others(backend):
    reqs = requests(backend)
    solo = [alone(backend, r) for r in reqs]
    got, _ = run_batch(backend.batch, reqs, join_every=1, leave={0: 2, 3: 3, 5: 1})
    for i, (ids, _text, _finish) in enumerate(solo):
        if i in (0, 3, 5):
            assert got[i]["ids"] == ids[: len(got[i]["ids"])] and got[i]["finish"] is None
        else:
            assert got[i]["ids"] == ids, f"request {i}"
    assert backend.batch.seqs == {} and backend.batch.lanes == {}


def test_a_long_prompt_is_read_in_chunks_while_the_others_keep_decoding(backend):
    from engine.serve.backend import GenerateRequest

    short = GenerateRequest(backend.tokenizer("hi").input_ids, 30, temperature=0)
    long = GenerateRequest(backend.tokenizer("word " * 60).input_ids, 3, temperature=0)
    batch = backend.batch
    first = batch.add(short)
    batch.step()  # its prompt
    second = batch.add(long)
    chunks = -(-len(long.prompt_ids) // batch.chunk)
    for _ in range(chunks - 1):
        out = batch.step()
        assert first in out and second not in out  # the short one decodes while the long prompt is read
    out = batch.step()
    assert first in out and second in out  # the long one's first token comes with its last chunk
    for slot in (first, second):
        batch.drop(slot)
    assert batch.lanes == {}


def test_bad_requests_are_refused_when_added_and_leave_nothing_behind(backend):
    from engine.errors import UserError
    from engine.serve.backend import AdapterScale, GenerateRequest

    batch = backend.batch
    with pytest.raises(UserError, match="not loaded"):
        batch.add(GenerateRequest([1, 2], 4, adapters=(AdapterScale("nope"),)))
    with pytest.raises(UserError, match="vocabulary"):
        batch.add(GenerateRequest([10**6], 4))
    with pytest.raises(UserError, match="empty"):
        batch.add(GenerateRequest([], 4))
    assert batch.seqs == {}


# --- the mixed lane's stacked per-row LoRA (engine/serve/backends/lora_rows.py) -------------------


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """A float64 tiny base with plain adapters of three ranks and layer sets, a DoRA one and one
    on the embeddings (which does not stack)."""
    from engine.model import TinySpec, build_tiny
    from engine.serve.backends.hf import HfBackend

    root = tmp_path_factory.mktemp("mixed")
    model, tokenizer = build_tiny(TinySpec(kind="tiny"))
    backend = HfBackend(model.double(), tokenizer, model_id="tiny", context_length=64, device="cpu", max_batch=8)
    saved = {
        "a": save_adapter(root / "a", seed=1),
        "w": _save_wide(root / "w"),
        "t": save_adapter(root / "t", 4, r=2, lora_alpha=8, target_modules=["down_proj"]),
        "d": _save_dora(root / "d"),
        "e": save_adapter(root / "e", 6, r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"]),
    }
    for name, path in saved.items():
        backend.load_adapter(name, path)
    yield backend
    backend.close()


def _logits(backend, names: list[str], *, stacks=None):
    """Logits of one forward, row i on PEFT adapter ``names[i]``: through ``stacks`` if given,
    else PEFT's ``adapter_names`` path."""
    import torch

    ids = torch.arange(len(names) * 5).remainder(97).add(3).view(len(names), 5)
    with torch.inference_mode():
        if stacks is None:
            return backend.peft(input_ids=ids, adapter_names=names).logits
        with stacks.applied(names) as base_rows:
            return backend.peft(input_ids=ids, adapter_names=base_rows).logits


def test_stacked_rows_give_peft_per_row_logits_across_ranks_layers_and_base(mixed):
    import torch

    from engine.serve.backends.lora_rows import BASE

    assert mixed.peft.get_input_embeddings().weight.dtype == torch.float64
    internal = mixed._internal
    stacks = mixed.batch._stacks.get(mixed.peft, mixed.batch._mixable())
    # Not d (DoRA runs in lanes of its own) nor e (LoRA on the embeddings: PEFT's loop).
    assert sorted(stacks.slots) == sorted(internal[n] for n in ("a", "w", "t"))
    names = [internal["a"], BASE, internal["w"], internal["t"], internal["w"], BASE, internal["a"]]
    want = _logits(mixed, names)
    got = _logits(mixed, names, stacks=stacks)
    base = _logits(mixed, [BASE] * len(names))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    for i, name in enumerate(names):  # every adapter changes its rows, and only them
        moved = (want[i] - base[i]).abs().max()
        assert moved == 0 if name == BASE else moved > 1e-3, (i, name)
    assert mixed.batch._stacks.get(mixed.peft, mixed.batch._mixable()) is stacks  # nothing loaded: kept


def test_adapters_that_do_not_stack_run_through_peft_with_one_notice(mixed, caplog):
    """LoRA on the embeddings (checked from PEFT's layers) and an adapter whose stacked logits
    disagree with PEFT's (the self-check, provoked here) take PEFT's loop, and say so once."""
    import logging

    import torch

    from engine.serve.backends import lora_rows

    internal = mixed._internal
    stacks = mixed.batch._stacks.get(mixed.peft, mixed.batch._mixable())
    assert not stacks.covers([internal["a"], internal["e"]])
    assert stacks.covers([internal["a"], lora_rows.BASE])
    assert "Embedding layers" in lora_rows.unsupported(mixed.peft, internal["e"])

    def doubled(layer, mask):  # a stack gone wrong: twice each delta
        hook = real(layer, mask)
        return lambda module, args, output: hook(module, args, hook(module, args, output))

    real, fresh = lora_rows._adder, lora_rows.Stacks()
    with caplog.at_level(logging.INFO, logger="engine.serve"):
        lora_rows._adder = doubled
        try:
            assert fresh.get(mixed.peft, mixed.batch._mixable()) is None
            assert fresh.get(mixed.peft, mixed.batch._mixable()) is None  # not rebuilt: no second notice
        finally:
            lora_rows._adder = real
    told = [r.getMessage() for r in caplog.records if "PEFT's per-adapter loop" in r.getMessage()]
    assert sorted(m.split()[2] for m in told) == sorted(internal[n] for n in ("a", "w", "t", "e")), told
    assert sum("differ from PEFT's own" in m for m in told) == 3

    # In the batch, a step with a row that does not stack is PEFT's own, to the last bit.
    from engine.serve.backend import AdapterScale, GenerateRequest
    from engine.serve.backends.hf_batch import MIXED, Seq

    rows = [Seq(GenerateRequest([1], 1, adapters=(AdapterScale(n),)), MIXED, 1, None) for n in ("a", "e")]
    ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
    with torch.inference_mode():
        from transformers import DynamicCache

        got = mixed.batch._forward(MIXED, ids, rows=rows, cache=DynamicCache()).logits
        want = mixed.peft(input_ids=ids, adapter_names=[internal["a"], internal["e"]], logits_to_keep=1).logits
    assert torch.equal(got, want)


def test_an_adapter_loaded_between_steps_joins_the_stacks(mixed, tmp_path):
    import torch

    from engine.serve.backends.lora_rows import BASE

    before = mixed.batch._stacks.get(mixed.peft, mixed.batch._mixable())
    mixed.load_adapter("late", save_adapter(tmp_path / "late", 7, r=6, lora_alpha=12, target_modules=["o_proj", "up_proj"]))
    after = mixed.batch._stacks.get(mixed.peft, mixed.batch._mixable())
    late = mixed._internal["late"]
    assert after is not before and after.covers([late]) and not before.covers([late])
    names = [late, mixed._internal["a"], BASE]
    torch.testing.assert_close(_logits(mixed, names, stacks=after), _logits(mixed, names), rtol=1e-10, atol=1e-10)
