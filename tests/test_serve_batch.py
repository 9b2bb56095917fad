"""Continuous batching on the hf backend: each request's answer in company is its answer alone.

The reference is the request run alone through the same backend (``generate``), which is
also today's serial server. Requests differ in prompt length, budget, stop strings, seeds,
temperature and adapter set (base, either adapter, a blend, a scaled adapter, a DoRA
adapter), join at different steps, and one leaves mid-batch.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import save_adapter


def _save_dora(dest: Path) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model

    from engine.model import TinySpec, build_tiny

    model, _ = build_tiny(TinySpec(kind="tiny"))
    with torch.random.fork_rng():
        torch.manual_seed(5)
        config = LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj"], init_lora_weights=False, use_dora=True)
        get_peft_model(model, config).save_pretrained(dest)
    return dest


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    from engine.model import HfSpec as ModelSpec
    from engine.model import TinySpec, build_tiny
    from engine.serve.backends.hf import HfSpec, load_hf

    root = tmp_path_factory.mktemp("batch")
    model, tokenizer = build_tiny(TinySpec(kind="tiny"))
    model.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    adapters = {"a": save_adapter(root / "a", seed=1), "b": save_adapter(root / "b", seed=2), "d": _save_dora(root / "d")}
    spec = HfSpec(kind="hf", device="cpu", context_length=160, max_batch=8, prefill_chunk=6)
    backend = load_hf(spec, model_spec=ModelSpec(kind="hf", name_or_path=str(root / "base")), adapter_paths=adapters)
    yield backend
    backend.close()


def requests(backend) -> list:
    from engine.serve.backend import AdapterScale as A
    from engine.serve.backend import GenerateRequest

    sets = [(), (A("a"),), (A("b"),), (A("a", 0.5), A("b", 0.5)), (A("a"),), (A("d"),), (A("b", 2.0),), ()]
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
