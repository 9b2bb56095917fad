"""The training loop's parts in-process: schedules, checkpoint files, resume decisions, OOM recovery."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from conftest import TINY, compose

from engine.config.record import freeze
from engine.errors import ConfigError
from engine.train import checkpoint as ck
from engine.train.optim import lr_lambda
from engine.train.step import accumulate


def test_schedules_warm_up_then_follow_their_shape():
    for name in ("linear", "cosine", "constant"):
        f = lr_lambda(name, warmup=4, total=20)
        assert [round(f(s), 3) for s in range(4)] == [0.2, 0.4, 0.6, 0.8]
        assert f(4) == 1.0
    assert lr_lambda("linear", 0, 10)(10) == 0.0
    assert lr_lambda("cosine", 0, 10)(5) == pytest.approx(0.5)
    assert lr_lambda("constant", 0, 10)(9) == 1.0


def _write(run_dir: Path, step: int, **state):
    return ck.write_checkpoint(
        run_dir,
        step,
        tensors={"w": torch.full((3,), float(step))},
        optimizer={"state": {0: {"exp_avg": torch.ones(3)}}, "param_groups": [{"lr": 0.1, "params": [0]}]},
        scheduler={"last_epoch": step},
        rng=[ck.rng_state()],
        state={"config_hash": "h", **state},
    )


def test_checkpoint_round_trip_and_partial_writes_are_ignored(tmp_path):
    _write(tmp_path, 2)
    # A half-written checkpoint (no state.json) and one whose file was truncated.
    (tmp_path / "checkpoints" / ".tmp-step-4").mkdir()
    bad = _write(tmp_path, 6)
    with open(bad / "optimizer.pt", "r+b") as f:
        f.truncate(10)
    assert [c.step for c in ck.complete_checkpoints(tmp_path)] == [2]
    data = ck.load_checkpoint(ck.latest_checkpoint(tmp_path))
    assert torch.equal(data["tensors"]["w"], torch.full((3,), 2.0))
    assert data["scheduler"]["last_epoch"] == 2 and data["state"]["step"] == 2


def test_rng_states_restore_exactly():
    import random

    import numpy as np

    state = ck.rng_state()
    a = (random.random(), np.random.rand(), torch.rand(2))
    ck.set_rng_state(state)
    b = (random.random(), np.random.rand(), torch.rand(2))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


def test_rotation_keeps_the_newest_and_the_best(tmp_path):
    for step in (2, 4, 6, 8):
        _write(tmp_path, step)
    ck.rotate(tmp_path, keep_last=2, protect={2})
    assert [c.step for c in ck.complete_checkpoints(tmp_path)] == [2, 6, 8]


def test_truncate_log_drops_later_steps_and_a_torn_line(tmp_path):
    log = tmp_path / "train_log.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 6)) + '{"step": 6, "lo')
    assert ck.truncate_log(log, 3) == 3
    assert [json.loads(x)["step"] for x in log.read_text().splitlines()] == [1, 2, 3]


def test_config_hash_ignores_keys_that_do_not_change_the_math():
    raw = compose([*TINY]).raw
    cosmetic = json.loads(json.dumps(raw))
    cosmetic["train"].update(loggers=["tensorboard"], plot=False, save_every=7, resume="force")
    cosmetic["stages"] = ["prepare_data", "train"]
    assert ck.config_hash(cosmetic) == ck.config_hash(raw)
    changed = json.loads(json.dumps(raw))
    changed["train"]["lr"] = 1.0
    assert ck.config_hash(changed) != ck.config_hash(raw)
    assert ck.config_diff(ck.hashed_config(raw), ck.hashed_config(changed)) == [f"train.lr: {raw['train']['lr']!r} -> 1.0"]


def test_resume_never_moves_the_old_attempt_aside(tmp_path):
    cfg = compose([*TINY])
    _write(tmp_path, 2, config_hash=ck.config_hash(cfg.raw))
    (tmp_path / "train_log.jsonl").write_text('{"step": 1}\n')
    assert freeze(cfg, tmp_path).step == 2  # auto: same config resumes

    fresh = dataclasses.replace(cfg, train=cfg.train.model_copy(update={"resume": "never"}))
    assert freeze(fresh, tmp_path) is None
    moved = list((tmp_path / "superseded").glob("*/checkpoints/step-2/state.json"))
    assert moved and not (tmp_path / "checkpoints").exists() and not (tmp_path / "train_log.jsonl").exists()


def test_resume_with_another_config_is_refused(tmp_path):
    cfg = compose([*TINY])
    _write(tmp_path, 2, config_hash="0" * 16, config=ck.hashed_config(compose([*TINY, "train.lr=1.0"]).raw))
    with pytest.raises(ConfigError, match=r"train\.lr: 1\.0 -> 0\.0003.*train\.resume=force"):
        freeze(cfg, tmp_path)
    assert not (tmp_path / "config.yaml").exists()
    forced = dataclasses.replace(cfg, train=cfg.train.model_copy(update={"resume": "force"}))
    assert freeze(forced, tmp_path).step == 2


def test_train_spec_checks():
    assert compose([*TINY, "train.resume=false"]).train.resume == "never"
    with pytest.raises(ConfigError, match="train.patience needs train.eval_every"):
        compose([*TINY, "train.patience=2"])
    with pytest.raises(ConfigError, match="train.loggers"):
        compose([*TINY, "train.loggers=[neptune]"])


# ---------------------------------------------------------------- OOM recovery


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    return LlamaForCausalLM(cfg)


class _OOMAbove(torch.nn.Module):
    """Wraps a model; raises CUDA's OOM error for batches of more than ``rows`` rows."""

    def __init__(self, model, rows: int):
        super().__init__()
        self.module, self.rows, self.seen = model, rows, []

    def forward(self, **kw):
        n = kw["input_ids"].shape[0]
        if n > self.rows:
            raise torch.OutOfMemoryError("CUDA out of memory (mocked)")
        self.seen.append(n)
        return self.module(**kw)


def _batch(seed: int, rows: int = 4, t: int = 6) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (rows, t), generator=g)
    return {
        "input_ids": ids,
        "labels": ids.clone(),
        "attention_mask": torch.ones_like(ids),
        "real_tokens": torch.tensor(rows * t),
    }


def test_cuda_oom_halves_the_micro_batch_and_keeps_the_effective_batch():
    from accelerate import Accelerator

    from engine.loss import LOSSES, CESpec

    acc = Accelerator(cpu=True)
    loss_fn = LOSSES.build(CESpec(kind="ce"))
    micro = [_batch(1), _batch(2)]

    ref = _tiny_llama()
    opt = torch.optim.AdamW(ref.parameters())
    loss_ref, _, tokens_ref, splits = accumulate(ref, [dict(b) for b in micro], loss_fn, acc, opt)
    assert splits == 1

    wrapped = _OOMAbove(_tiny_llama(), rows=2)
    opt = torch.optim.AdamW(wrapped.parameters())
    with pytest.warns(UserWarning, match="out of memory: micro-batch cut into 2 pieces"):
        loss, parts, tokens, splits = accumulate(wrapped, [dict(b) for b in micro], loss_fn, acc, opt)
    assert splits == 2 and wrapped.seen == [2, 2, 2, 2]  # every row still seen, 2 at a time
    assert tokens == tokens_ref == 48
    # Same rows, same lengths: the row-weighted halves give the full batch's loss and gradient.
    assert loss == pytest.approx(loss_ref, rel=1e-5) and parts["ce"] == pytest.approx(loss_ref, rel=1e-5)
    for (n, p), q in zip(ref.named_parameters(), wrapped.module.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=n)

    one_row = _OOMAbove(_tiny_llama(), rows=0)
    with pytest.raises(torch.OutOfMemoryError):
        accumulate(one_row, [_batch(3, rows=1)], loss_fn, acc, torch.optim.AdamW(one_row.parameters()))


def test_gradient_checkpointing_gives_the_same_gradients():
    from accelerate import Accelerator

    from engine.loss import LOSSES, CESpec

    acc = Accelerator(cpu=True)
    loss_fn = LOSSES.build(CESpec(kind="ce"))
    plain, ckpt = _tiny_llama(), _tiny_llama()
    ckpt.gradient_checkpointing_enable()
    ckpt.train()
    grads = []
    for model in (plain, ckpt):
        accumulate(model, [_batch(4)], loss_fn, acc, torch.optim.AdamW(model.parameters()))
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------- checksums, force, divergence


def test_damaged_checkpoint_is_set_aside_and_the_previous_one_used(tmp_path, capsys):
    _write(tmp_path, 2)
    bad = _write(tmp_path, 4)
    state = json.loads((bad / "state.json").read_text())
    assert set(state["files"]["optimizer.pt"]) == {"size", "sha256"}
    with open(bad / "trainable.safetensors", "r+b") as f:  # same size, other bytes
        f.seek(20)
        f.write(b"\0" * 4)
    assert [c.step for c in ck.complete_checkpoints(tmp_path)] == [2, 4]  # sizes alone cannot tell
    assert ck.resume_checkpoint(tmp_path, is_main=True).step == 2
    assert "checkpoint step-4 is damaged: trainable.safetensors checksum mismatch; using step-2" in capsys.readouterr().out
    assert (tmp_path / "checkpoints" / "damaged-step-4").is_dir() and not bad.exists()


def test_no_intact_checkpoint_is_refused_and_old_manifests_still_load(tmp_path):
    old = _write(tmp_path, 2)
    state = json.loads((old / "state.json").read_text())
    state["files"] = {name: entry["size"] for name, entry in state["files"].items()}  # written before checksums
    (old / "state.json").write_text(json.dumps(state))
    assert ck.resume_checkpoint(tmp_path, is_main=True).step == 2
    (old / "rng.pt").write_bytes(b"x")
    with pytest.raises(ConfigError, match=r"every checkpoint .* damaged \(step-2: rng.pt has 1 bytes.*train\.resume=never"):
        ck.resume_checkpoint(tmp_path, is_main=True)
    assert old.is_dir()  # nothing is moved when nothing is usable


def test_force_refuses_what_resume_cannot_reapply():
    raw = compose([*TINY]).raw
    new = json.loads(json.dumps(raw))
    new["train"].update(lr=1.0, max_steps=99, warmup_steps=1, micro_batch_size=7)
    new["adapter"]["r"] = 3
    new["seed"] = 5
    refused = ck.force_refusals(ck.hashed_config(raw), ck.hashed_config(new))
    assert [r.split(":")[0] for r in refused] == ["adapter.r", "seed", "train.micro_batch_size"]
    assert "which parameters train or their shapes" in refused[0]


def test_reapplied_hyperparameters_follow_the_new_config():
    from engine.train.optim import reapply_hyperparameters

    def make(lr: float, total: int):
        w = torch.nn.Parameter(torch.ones(2))
        opt = torch.optim.AdamW([w], lr=lr, weight_decay=0.0)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda("cosine", 2, total))

    opt, sched = make(1e-3, 10)
    for _ in range(4):
        opt.step()
        sched.step()
    saved = (opt.state_dict(), sched.state_dict())
    # Unchanged config: every value is the one loaded (resume stays bit-identical).
    same_opt, same_sched = make(1e-3, 10)
    same_opt.load_state_dict(saved[0])
    same_sched.load_state_dict(saved[1])
    reapply_hyperparameters(same_opt, same_sched, compose([*TINY, "train.lr=1e-3"]).train)
    assert same_sched.get_last_lr() == sched.get_last_lr() and same_opt.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    # Changed lr, length and weight decay: the new schedule at the restored step.
    new_opt, new_sched = make(1e-3, 20)
    new_opt.load_state_dict(saved[0])
    new_sched.load_state_dict(saved[1])
    tcfg = compose([*TINY, "train.lr=5e-3", "train.weight_decay=0.1", "train.betas=[0.8,0.9]"]).train
    reapply_hyperparameters(new_opt, new_sched, tcfg)
    want = 5e-3 * lr_lambda("cosine", 2, 20)(4)
    assert new_opt.param_groups[0]["lr"] == new_sched.get_last_lr()[0] == want
    assert new_opt.param_groups[0]["weight_decay"] == 0.1 and new_opt.param_groups[0]["betas"] == (0.8, 0.9)
    new_opt.step()
    new_sched.step()
    assert new_sched.get_last_lr()[0] == 5e-3 * lr_lambda("cosine", 2, 20)(5)


def test_divergence_guard_trips_on_blow_ups_only():
    from engine.train.guard import Guard

    healthy = Guard(lr=1e-2, weight_norm=2.0)
    # A healthy run: loss falls, weights grow a little (x1.4 at lr 1e-2 on the tiny model).
    assert all(healthy.problem(loss, 0.3, 2.0 * (1 + k / 10)) is None for k, loss in enumerate([7.0, 6.5, 3.0, 0.01]))
    assert "loss became nan" in Guard(1.0, 2.0).problem(float("nan"), 0.3, 2.0)
    assert "gradient norm became inf" in Guard(1.0, 2.0).problem(7.0, float("inf"), 2.0)
    assert "grew 1.5e10 times" in Guard(1e9, 2.0).problem(7.0, 0.4, 3e10)
    grows = Guard(1.0, 2.0)
    assert grows.problem(7.0, 0.4, 2.0) is None
    assert "loss grew from 7 to 8000" in grows.problem(8000.0, 0.4, 2.0)
