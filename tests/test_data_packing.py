"""Batching: packing isolates examples exactly, streams resume by position, padding is low."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, TINY_TOKENIZER

from engine.data import Example, prepare
from engine.data.collate import Batches, pack, packed_collate, pad_collate
from engine.data.spec import DataSpec

QA = str(ROOT / "engine" / "samples" / "env_science_qa.jsonl")
SMOLLM2 = Path.home() / ".cache" / "engine" / "models" / "SmolLM2-135M-Instruct.Q4_1"


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(TINY_TOKENIZER)
    t.pad_token = t.pad_token or t.eos_token
    return t


@pytest.fixture(scope="module")
def bundle(tok):
    return prepare(DataSpec(kind="instruction", path=QA, template="chatml"), tok, seed=0)


def tiny_model(attn: str, vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        attn_implementation=attn,
    )
    return LlamaForCausalLM(cfg).eval()


def per_example_losses(model, batch, rows: list[list[Example]]) -> list[torch.Tensor]:
    """Mean next-token CE of each example, cut out of its (packed or padded) row."""
    extra = {"segment_lengths": batch["segment_lengths"]} if "segment_lengths" in batch else {}
    out = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch.get("position_ids"), **extra
    )
    losses = []
    for r, row in enumerate(rows):
        at = 0
        for e in row:
            k = len(e.input_ids)
            logits, labels = out.logits[r, at : at + k - 1], batch["labels"][r, at + 1 : at + k]
            losses.append(F.cross_entropy(logits.float(), labels, ignore_index=-100))
            at += k
    return losses


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_matches_unpacked_per_example(attn, bundle, tok):
    examples = bundle.splits["train"][:12]
    model = tiny_model(attn, len(tok))
    with torch.no_grad():
        alone = per_example_losses(model, pad_collate(examples, tok.pad_token_id), [[e] for e in examples])
        rows = [examples[0:5], examples[5:9], examples[9:12]]
        packed = per_example_losses(model, packed_collate(rows, tok.pad_token_id), rows)
    diff = max(abs(a - b).item() for a, b in zip(alone, packed, strict=True))
    assert diff < 1e-4, diff


def test_segment_attention_matches_unpacked_loss_and_gradients(bundle, tok):
    """sdpa_segments (no mask tensor, causal SDPA per example) == each example alone, grads too."""
    from engine.speed.attention import NAME, restore_sdpa, use_segments

    examples = bundle.splits["train"][:12]
    rows = [examples[0:5], examples[5:9], examples[9:12]]
    model = tiny_model("sdpa", len(tok)).train()
    assert use_segments(model) and model.config._attn_implementation == NAME

    def grads(batch, rows):
        model.zero_grad()
        losses = per_example_losses(model, batch, rows)
        torch.stack(losses).sum().backward()
        return losses, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    packed_batch = packed_collate(rows, tok.pad_token_id, segments=True)
    assert "segment_lengths" in packed_batch and packed_batch["attention_mask"].dim() == 2
    assert packed_batch["segment_lengths"].tolist()[2][:3] == [len(e.input_ids) for e in rows[2]]
    packed, g_packed = grads(packed_batch, rows)
    alone, g_alone = grads(pad_collate(examples, tok.pad_token_id), [[e] for e in examples])
    assert max(abs(a - b).item() for a, b in zip(alone, packed, strict=True)) < 1e-4
    assert max((g_alone[n] - g_packed[n]).abs().max().item() for n in g_alone) < 1e-4
    # Without segment_lengths (generation, unpacked batches) it is plain sdpa.
    with torch.no_grad():
        plain = per_example_losses(model, pad_collate(examples, tok.pad_token_id), [[e] for e in examples])
    assert max(abs(a - b).item() for a, b in zip(alone, plain, strict=True)) < 1e-5
    restore_sdpa(model)
    assert model.config._attn_implementation == "sdpa"


def test_packed_batch_layout(tok):
    a = Example([5, 6, 7], [-100, 6, 7], [])
    b = Example([8, 9], [8, 9], [])
    batch = packed_collate([[a, b], [b]], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [8, 9, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]]
    # The first token of each packed example is not a label (nothing before it in its example).
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9], [-100, 9, -100, -100, -100]]
    assert batch["real_tokens"].item() == 7
    mask = batch["attention_mask"]
    assert mask.shape == (2, 1, 5, 5) and mask.dtype == torch.float32
    allowed = (mask[0, 0] == 0).int().tolist()
    assert allowed == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 1, 1]]
    assert mask.min().item() == torch.finfo(torch.float32).min


def test_pack_respects_capacity_and_uses_every_example():
    lengths = [30, 70, 10, 50, 50, 90, 20, 5]
    rows = pack(lengths, 100)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in r) <= 100 for r in rows)
    assert len(rows) == 4  # 325 tokens: best possible is 4 rows of 100
    assert pack(lengths, 100) == rows


@pytest.mark.parametrize("packing,group", [(False, False), (False, True), (True, False)])
def test_stream_resumes_at_a_position_and_covers_the_epoch(packing, group, bundle, tok):
    kw = dict(micro_batch_size=4, pad_id=tok.pad_token_id, seed=3, packing=packing, group_by_length=group, max_length=512)
    batches = Batches(bundle.splits["train"], **kw)
    it = batches.stream()
    first = [next(it) for _ in range(len(batches) + 3)]
    resumed = Batches(bundle.splits["train"], **kw).stream(start=len(batches) + 1)
    for want in first[len(batches) + 1 :]:
        got = next(resumed)
        assert all(torch.equal(got[k], want[k]) for k in want)
    used = [i for b in batches.epoch_batches(0) for r in b for i in batches.rows[r]]
    assert len(used) == len(set(used))
    dropped = {i for r in range(len(batches.rows)) for i in batches.rows[r]} - set(used)
    assert len(dropped) < 4 * max(len(r) for r in batches.rows)  # only the part of one batch


def test_ranks_get_disjoint_shards(bundle, tok):
    kw = dict(micro_batch_size=2, pad_id=tok.pad_token_id, seed=0, world=2)
    r0, r1 = Batches(bundle.splits["train"], rank=0, **kw), Batches(bundle.splits["train"], rank=1, **kw)
    assert len(r0) == len(r1)
    s0 = {i for b in r0.epoch_batches(0) for i in b}
    s1 = {i for b in r1.epoch_batches(0) for i in b}
    assert not s0 & s1


def test_padding_efficiency_with_packing_on_the_shipped_set(bundle, tok):
    kw = dict(micro_batch_size=4, pad_id=tok.pad_token_id, seed=0, max_length=512)
    plain = Batches(bundle.splits["train"], **kw).padding_efficiency()
    grouped = Batches(bundle.splits["train"], group_by_length=True, **kw).padding_efficiency()
    packed = Batches(bundle.splits["train"], packing=True, **kw).padding_efficiency()
    assert packed >= 0.95 and grouped > plain, (plain, grouped, packed)


@pytest.mark.skipif(not (SMOLLM2 / "tokenizer.json").exists(), reason="SmolLM2 not converted into ~/.cache/engine yet")
def test_padding_efficiency_with_packing_smollm2_tokenizer():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(SMOLLM2)
    b = prepare(DataSpec(kind="instruction", path=QA), tok, seed=0)
    eff = Batches(b.splits["train"], micro_batch_size=4, pad_id=0, seed=0, packing=True, max_length=512).padding_efficiency()
    assert eff >= 0.95, eff


def test_bf16_autocast_forward_with_the_packed_mask(bundle, tok):
    model = tiny_model("sdpa", len(tok))
    rows = [bundle.splits["train"][0:3]]
    batch = packed_collate(rows, tok.pad_token_id)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"])
    assert torch.isfinite(out.logits).all()
