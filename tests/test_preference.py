"""Preference tuning: pair data, the dpo/orpo/simpo losses, the adapter-off reference, the held-out metric.

The losses are checked against a direct computation from full-vocabulary log-probs of the
same rows (not the chunked, labelled-positions-only path they use); the reference against a
freshly built base model with the same weights; the training path through the real CLI.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
from pathlib import Path

import pytest
import torch
from conftest import QUICK_TRAIN, TINY, TINY_TOKENIZER, compose, run_cli, run_engine

from engine.data import IGNORE, DataSpec, prepare
from engine.data.collate import Batches, pair_collate
from engine.errors import ConfigError
from engine.loss import LOSSES, forward_loss
from engine.loss.ce import reference_logps
from engine.loss.preference import DPOSpec, ORPOSpec, SimPOSpec
from engine.train.checkpoint import complete_checkpoints
from engine.train.step import split_batch

PAIRS = [
    {"prompt": "What is a wetland?", "chosen": "Land covered by shallow water.", "rejected": "A desert with no water."},
    {"prompt": "What warms the planet?", "chosen": "Greenhouse gases trapping heat.", "rejected": "Cooling of the sun."},
    {"prompt": "What is humus?", "chosen": "Stable organic matter in soil.", "rejected": "Well, that depends on many things."},
]


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(TINY_TOKENIZER)
    t.pad_token = t.pad_token or t.eos_token
    return t


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def pairs_spec(path: Path, **kw) -> DataSpec:
    base = {
        "kind": "preference",
        "path": str(path),
        "template": "chatml",
        "split": {"train": 1.0, "validation": 0.0, "test": 0.0},
    }
    return DataSpec.model_validate({**base, **kw})


@pytest.fixture(scope="module")
def pair_examples(tok, tmp_path_factory):
    path = write_jsonl(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", PAIRS)
    return prepare(pairs_spec(path), tok, seed=0).splits["train"]


def tiny_lora():
    """The tiny model with a random (non-zero) LoRA: the policy differs from the base."""
    from peft import LoraConfig, get_peft_model

    from engine.model import TinySpec, build_tiny

    model, _ = build_tiny(TinySpec(kind="tiny"))
    with torch.random.fork_rng():
        torch.manual_seed(7)
        config = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
        return get_peft_model(model, config).eval()


def direct_logps(model, batch) -> torch.Tensor:
    """Summed log-prob of each row's labelled tokens from the full logits (the textbook way)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    y = batch["labels"][:, 1:]
    keep = y != IGNORE
    picked = logp.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * keep).sum(dim=1), keep.sum(dim=1)


# ---------------------------------------------------------------- data


def test_pairs_are_templated_and_masked_on_the_answer_only(pair_examples, tok):
    ex = pair_examples[0]
    assert ex.rejected is not None and ex.messages[-1]["role"] == "assistant"
    assert ex.prompt_messages == ex.rejected.messages[:-1]  # same prompt
    for side in (ex, ex.rejected):
        labelled = tok.decode([t for t in side.labels if t != IGNORE])
        assert labelled == side.messages[-1]["content"] + "<|im_end|>"
    chosen = {e.reference: e.rejected.messages[-1]["content"] for e in pair_examples}
    assert chosen == {p["chosen"]: p["rejected"] for p in PAIRS}


def test_chat_pair_layouts(tok, tmp_path):
    ultrafeedback = {  # the prompt repeated inside both lists, plus a prompt column
        "prompt": "Why plant trees?",
        "chosen": [{"role": "user", "content": "Why plant trees?"}, {"role": "assistant", "content": "They store carbon."}],
        "rejected": [{"role": "user", "content": "Why plant trees?"}, {"role": "assistant", "content": "No reason."}],
    }
    trl = {  # the prompt as turns, the answers alone (TRL's conversational layout), multi-turn
        "prompt": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is a bog?"},
            {"role": "assistant", "content": "A peat wetland."},
            {"role": "user", "content": "And a fen?"},
        ],
        "chosen": [{"role": "assistant", "content": "A wetland fed by groundwater."}],
        "rejected": [{"role": "assistant", "content": "A kind of fern."}],
    }
    hh = {  # Anthropic HH-RLHF transcripts, no prompt column
        "chosen": "\n\nHuman: Is smog bad?\n\nAssistant: Yes, it harms the lungs.",
        "rejected": "\n\nHuman: Is smog bad?\n\nAssistant: Smog is a band.",
    }
    path = write_jsonl(tmp_path / "chat_pairs.jsonl", [ultrafeedback, trl, hh])
    got = {e.reference: e for e in prepare(pairs_spec(path), tok, seed=0).splits["train"]}
    assert got["They store carbon."].prompt_messages == [{"role": "user", "content": "Why plant trees?"}]
    multi = got["A wetland fed by groundwater."]
    assert [m["role"] for m in multi.prompt_messages] == ["system", "user", "assistant", "user"]
    # Only the final answer is labelled: the earlier assistant turn is shared context.
    assert tok.decode([t for t in multi.labels if t != IGNORE]) == "A wetland fed by groundwater.<|im_end|>"
    assert got["Yes, it harms the lungs."].rejected.messages[-1]["content"] == "Smog is a band."


def test_bad_rows_are_rejected_with_reasons(tok, tmp_path):
    rows = [
        *PAIRS,
        {"prompt": "Q1?", "chosen": "A."},
        {"prompt": "Q2?", "chosen": "Same answer.", "rejected": "Same   answer."},
        {
            "chosen": [{"role": "user", "content": "Q3?"}, {"role": "assistant", "content": "A."}],
            "rejected": [{"role": "user", "content": "Other?"}, {"role": "assistant", "content": "B."}],
        },  # fmt: skip
        {"prompt": "Q4?", "chosen": [{"role": "user", "content": "Q4?"}], "rejected": "B."},
        {"prompt": "Q5?", "chosen": ["x"], "rejected": "B."},
        {"chosen": "A.", "rejected": "B."},
        {"prompt": "Why? " * 200, "chosen": "A.", "rejected": "B."},
    ]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    bundle = prepare(pairs_spec(path, max_length=64), tok, seed=0, run_dir=run_dir)
    assert len(bundle.splits["train"]) == len(PAIRS)
    rejected = [json.loads(line) for line in (run_dir / "rejected.jsonl").read_text().splitlines()]
    reasons = {r["row"]: r["reason"] for r in rejected}
    assert reasons == {
        3: "missing field",
        4: "chosen equals rejected",
        5: "prompts differ",
        6: "no assistant turn at the end",
        7: "wrong type",
        8: "missing field",
        9: "no answer within max_length",
    }
    details = {r["row"]: r["detail"] for r in rejected}
    assert "rejected" in details[3] and "prompt" in details[8]


def test_kind_auto_reads_a_pair_file(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    spec = DataSpec.model_validate({"kind": "auto", "path": str(path)})
    assert spec.kind == "preference" and "chosen" in spec.detected


def test_batches_keep_pairs_together(pair_examples, tok):
    batches = Batches(pair_examples, micro_batch_size=3, pad_id=tok.pad_token_id, seed=0)
    batch = next(batches.stream())
    assert batch["pairs"] == 3 and batch["input_ids"].shape[0] == 6
    order = [pair_examples[batches.rows[r][0]] for r in batches.epoch_batches(0)[0]]
    for i, ex in enumerate(order):  # row i is pair i's chosen, row 3 + i its rejected
        assert batch["input_ids"][i, : len(ex.input_ids)].tolist() == ex.input_ids
        assert batch["input_ids"][3 + i, : len(ex.rejected.input_ids)].tolist() == ex.rejected.input_ids
    # The OOM split cuts along pairs: each piece holds whole pairs, chosen rows first.
    pieces = list(split_batch(batch, 2))
    assert [p["pairs"] for p, _ in pieces] == [2, 1] and [w for _, w in pieces] == pytest.approx([2 / 3, 1 / 3])
    first = pieces[0][0]["input_ids"]
    assert torch.equal(first, batch["input_ids"][[0, 1, 3, 4]])


# ---------------------------------------------------------------- losses


@pytest.fixture(scope="module")
def fixed(pair_examples):
    """A LoRA policy, a fixed pair batch, and the direct log-probs of policy and reference."""
    model = tiny_lora()
    batch = pair_collate(pair_examples, pad_id=0)
    batch.pop("real_tokens")
    with torch.no_grad():
        policy, counts = direct_logps(model, batch)
        with model.disable_adapter():
            ref, _ = direct_logps(model, batch)
    assert not torch.allclose(policy, ref), "the adapter must change the log-probs"
    return model, batch, policy.double(), ref.double(), counts.double()


def _sigmoid_loss(z: float) -> float:
    return -math.log(1 / (1 + math.exp(-z)))


def test_dpo_equals_the_direct_computation(fixed):
    model, batch, pi, ref, _ = fixed
    n = batch["pairs"]
    for beta, eps in ((0.1, 0.0), (0.5, 0.2)):
        loss_fn = LOSSES.build(DPOSpec(kind="dpo", beta=beta, label_smoothing=eps, chunk_size=7))
        with torch.no_grad():
            loss, parts = forward_loss(model, batch, loss_fn)
        rc = [beta * (pi[i] - ref[i]).item() for i in range(n)]
        rr = [beta * (pi[n + i] - ref[n + i]).item() for i in range(n)]
        want = sum((1 - eps) * _sigmoid_loss(c - r) + eps * _sigmoid_loss(r - c) for c, r in zip(rc, rr, strict=True)) / n
        assert loss.item() == pytest.approx(want, rel=1e-5)
        assert parts["rewards_chosen"] == pytest.approx(sum(rc) / n, rel=1e-4, abs=1e-6)
        assert parts["rewards_rejected"] == pytest.approx(sum(rr) / n, rel=1e-4, abs=1e-6)
        assert parts["margin"] == pytest.approx((sum(rc) - sum(rr)) / n, rel=1e-4, abs=1e-6)
        assert parts["accuracy"] == pytest.approx(sum(c > r for c, r in zip(rc, rr, strict=True)) / n)


def test_orpo_equals_the_direct_computation(fixed):
    model, batch, pi, _, counts = fixed
    n = batch["pairs"]
    loss_fn = LOSSES.build(ORPOSpec(kind="orpo", weight=0.3, chunk_size=5))
    with torch.no_grad():
        loss, parts = forward_loss(model, batch, loss_fn)
    avg = (pi / counts).tolist()
    nll = -pi[:n].sum().item() / counts[:n].sum().item()

    def log_odds(p: float) -> float:
        return p - math.log(1 - math.exp(p))

    terms = [-_sigmoid_loss(log_odds(avg[i]) - log_odds(avg[n + i])) for i in range(n)]
    assert loss.item() == pytest.approx(nll - 0.3 * sum(terms) / n, rel=1e-5)
    assert parts["nll"] == pytest.approx(nll, rel=1e-5)
    assert parts["rewards_chosen"] == pytest.approx(sum(avg[:n]) / n, rel=1e-5)


def test_simpo_equals_the_direct_computation(fixed):
    model, batch, pi, _, counts = fixed
    n = batch["pairs"]
    loss_fn = LOSSES.build(SimPOSpec(kind="simpo", beta=2.0, gamma=0.5))
    with torch.no_grad():
        loss, parts = forward_loss(model, batch, loss_fn)
    avg = (pi / counts).tolist()
    want = sum(_sigmoid_loss(2.0 * (avg[i] - avg[n + i]) - 0.5) for i in range(n)) / n
    assert loss.item() == pytest.approx(want, rel=1e-5)
    assert parts["accuracy"] == pytest.approx(sum(avg[i] > avg[n + i] for i in range(n)) / n)


def test_reference_is_the_base_model_with_the_adapter_off(fixed):
    """The adapter-disabled pass equals a freshly built base (same weights, no adapter at all)."""
    from engine.model import TinySpec, build_tiny

    model, batch, pi, _, _ = fixed
    loss_fn = LOSSES.build(DPOSpec(kind="dpo"))
    ref = reference_logps(model, batch, loss_fn)
    fresh, _ = build_tiny(TinySpec(kind="tiny"))
    with torch.no_grad():
        want, _ = direct_logps(fresh.eval(), batch)
    assert torch.allclose(ref, want, atol=1e-4, rtol=1e-5)
    assert not torch.allclose(ref.double(), pi, atol=1e-3)  # the adapter is back on afterwards
    with torch.no_grad():
        again, _ = direct_logps(model, batch)
    assert torch.allclose(again.double(), pi)


def test_dpo_gradient_flows_only_through_the_policy(fixed):
    model, batch, _, _, _ = fixed
    loss_fn = LOSSES.build(DPOSpec(kind="dpo"))
    model.zero_grad()
    loss, _ = forward_loss(model, batch, loss_fn)
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_" in n]
    assert grads and all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    model.zero_grad()


# ---------------------------------------------------------------- config errors (exit 2)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["loss=dpo"], "loss: dpo learns from pairs of answers, but data kind is 'instruction'"),
        (["data=env_science_preference"], "loss: ce trains on one answer per example"),
        (["data=env_science_preference", "loss=dpo", "adapter=none"], "with adapter=none there is nothing to switch off"),
        (["data=env_science_preference", "loss=dpo", "data.packing=true"], "data.packing: preference pairs"),
        (["eval.metrics=[pref_accuracy]"], "eval.metrics: pref_accuracy compare the chosen and the rejected"),
    ],
)
def test_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        compose([*TINY, *overrides])


def test_orpo_and_simpo_need_no_adapter():
    for loss in ("orpo", "simpo"):
        cfg = compose([*TINY, "data=env_science_preference", f"loss={loss}", "adapter=none"])
        assert cfg.loss.kind == loss


def test_config_error_exits_2_without_traceback(tmp_path):
    proc = run_cli(*TINY, "loss=dpo", "adapter=none", f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "loss: dpo learns from pairs" in proc.stderr and "nothing to switch off" in proc.stderr
    assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------- end to end (tiny model, real CLI)

DPO_RUN = [*QUICK_TRAIN, "recipe=dpo_smollm2", "train.lr=1e-3", "train.save_every=2", "train.keep_last=2"]


def test_tiny_dpo_run_trains_logs_the_parts_and_scores_held_out_pairs(tmp_path):
    run_dir = tmp_path / "dpo"
    proc = run_engine(
        *DPO_RUN,
        "train.max_steps=4",
        "eval.max_examples=6",
        "eval.max_new_tokens=2",
        "eval.metrics=[pref_accuracy,pref_margin]",
        "data.split={train: 0.7, validation: 0.1, test: 0.2}",
        "train.eval_every=2",
        "stages=[prepare_data,train,evaluate,report]",
        f"hydra.run.dir={run_dir}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    for rec in log:
        assert {"rewards_chosen", "rewards_rejected", "margin", "accuracy"} <= set(rec)
    # Step 1: the LoRA's B starts at zero, so policy = reference and the loss is log 2.
    assert log[0]["loss"] == pytest.approx(math.log(2), abs=1e-5) and log[0]["margin"] == 0.0
    for rec in log[1:]:  # training moved the policy off the reference; the parts agree with each other
        assert rec["margin"] != 0.0 and 0.0 <= rec["accuracy"] <= 1.0
        assert rec["margin"] == pytest.approx(rec["rewards_chosen"] - rec["rewards_rejected"], abs=1e-6)
    assert all("val_loss" in rec for rec in log if rec["step"] % 2 == 0)  # validation runs on pairs too
    ev = json.loads((run_dir / "metrics.json").read_text())["evaluate"]
    for where in (ev["test"], ev["base"]["test"]):
        assert 0.0 <= where["pref_accuracy"] <= 1.0 and isinstance(where["pref_margin"], float)
    report = (run_dir / "report.md").read_text()
    assert "| pref_accuracy |" in report and "| pref_margin |" in report


def _train(run_dir: Path, crash_at: str | None = None):
    os.environ.pop("ENGINE_CRASH_AT", None)
    if crash_at:
        os.environ["ENGINE_CRASH_AT"] = crash_at
    try:
        args = [*DPO_RUN, "stages=[prepare_data,train]", "train.max_steps=6", "train.grad_accum=2", "train.warmup_steps=2"]
        return run_engine(*args, f"hydra.run.dir={run_dir}")
    finally:
        os.environ.pop("ENGINE_CRASH_AT", None)


@pytest.mark.slow
def test_dpo_resumes_bit_identically_after_sigkill(tmp_path):
    baseline = tmp_path / "baseline"
    assert _train(baseline).returncode == 0

    run_dir = tmp_path / "crashy"
    r = _train(run_dir, crash_at="step:3")
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert [c.step for c in complete_checkpoints(run_dir)] == [2]
    r = _train(run_dir)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming from" in r.stdout and "step 2" in r.stdout

    same = (run_dir / "adapter" / "adapter_model.safetensors").read_bytes()
    assert same == (baseline / "adapter" / "adapter_model.safetensors").read_bytes()
    logs = [[json.loads(line) for line in (d / "train_log.jsonl").read_text().splitlines()] for d in (run_dir, baseline)]
    keys = ("step", "loss", "rewards_chosen", "rewards_rejected", "margin", "accuracy")
    assert [[rec[k] for k in keys] for rec in logs[0]] == [[rec[k] for k in keys] for rec in logs[1]]
