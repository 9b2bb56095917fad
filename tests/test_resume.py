"""Crash safety end to end: kill the real CLI at exact points, re-run, get the same adapter.

The uninterrupted run and the killed-and-resumed run share every setting (tiny model, CPU,
fp32, LoRA dropout on, so RNG restore matters); ``ENGINE_CRASH_AT`` makes a run SIGKILL
itself after a step is logged or in the middle of writing a checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, TINY, run_cli, run_engine

from engine.train.checkpoint import complete_checkpoints

ARGS = [
    *TINY,
    "stages=[prepare_data,train]",
    "precision=fp32",
    "device=cpu",
    "train.max_steps=8",
    "train.save_every=2",
    "train.keep_last=2",
    "train.micro_batch_size=2",
    "train.grad_accum=2",
    "train.warmup_steps=2",
    "train.lr=1e-3",
]


def _run(run_dir: Path, *extra: str, crash_at: str | None = None):
    os.environ.pop("ENGINE_CRASH_AT", None)
    if crash_at:
        os.environ["ENGINE_CRASH_AT"] = crash_at
    try:
        return run_engine(*ARGS, *extra, f"hydra.run.dir={run_dir}")
    finally:
        os.environ.pop("ENGINE_CRASH_AT", None)


def _log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> Path:
    """One uninterrupted run (also with TensorBoard and the plot on)."""
    run_dir = tmp_path_factory.mktemp("resume") / "baseline"
    r = _run(run_dir, "train.loggers=[tensorboard]", "train.plot=true")
    assert r.returncode == 0, r.stderr[-3000:]
    return run_dir


@pytest.mark.slow
def test_sigkill_at_three_points_then_resume_is_bit_identical(baseline, tmp_path):
    run_dir = tmp_path / "crashy"
    # 1. Killed after step 3 was logged, before its checkpoint: step-2 is the latest.
    r = _run(run_dir, crash_at="step:3")
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert [c.step for c in complete_checkpoints(run_dir)] == [2]
    assert [rec["step"] for rec in _log(run_dir)] == [1, 2, 3]

    # 2. Resumed from step 2, killed in the middle of writing step-4: the half-written
    #    checkpoint exists on disk but is never taken for a complete one.
    r = _run(run_dir, crash_at="checkpoint:4")
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert "resuming from" in r.stdout and "step 2" in r.stdout
    assert (run_dir / "checkpoints" / ".tmp-step-4").is_dir()
    assert [c.step for c in complete_checkpoints(run_dir)] == [2]

    # 3. Resumed from step 2 again (the partial dir is removed), killed after step 7.
    r = _run(run_dir, crash_at="step:7")
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert not (run_dir / "checkpoints" / ".tmp-step-4").exists()
    assert [c.step for c in complete_checkpoints(run_dir)] == [4, 6]  # keep_last=2

    # 4. Resumed from step 6 and finished.
    r = _run(run_dir)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "step 6" in r.stdout

    same = (run_dir / "adapter" / "adapter_model.safetensors").read_bytes()
    assert same == (baseline / "adapter" / "adapter_model.safetensors").read_bytes()
    log, base_log = _log(run_dir), _log(baseline)
    assert [rec["step"] for rec in log] == list(range(1, 9))  # no duplicated steps
    assert [rec["loss"] for rec in log] == [rec["loss"] for rec in base_log]
    assert [rec["lr"] for rec in log] == [rec["lr"] for rec in base_log]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["train"]["resumed_from_step"] == 6


@pytest.mark.slow
def test_changed_config_refuses_and_force_goes_on(baseline, tmp_path):
    run_dir = tmp_path / "changed"
    shutil.copytree(baseline, run_dir)
    before = (run_dir / "config.yaml").read_text()

    r = _run(run_dir, "train.lr=5e-4")
    assert r.returncode == 2, r.stderr[-2000:]
    assert "train.lr: 0.001 -> 0.0005" in r.stderr and "train.resume=force" in r.stderr
    assert "Traceback" not in r.stderr
    assert (run_dir / "config.yaml").read_text() == before  # the record was not clobbered

    # Keys that do not change the math (loggers, plot, save_every, ...) do not block resume.
    r = _run(run_dir, "train.plot=false", "train.save_every=4")
    assert r.returncode == 0, r.stderr[-2000:]

    r = _run(run_dir, "train.lr=5e-4", "train.max_steps=10", "train.resume=force")
    assert r.returncode == 0, r.stderr[-3000:]
    assert [rec["step"] for rec in _log(run_dir)] == list(range(1, 11))
    assert json.loads((run_dir / "metrics.json").read_text())["train"]["resumed_from_step"] == 8
    assert list(run_dir.glob("config.*.yaml")), "the earlier config.yaml is kept beside the new one"


# ---------------------------------------------------------------- damaged checkpoints


def _damage(path: Path, offset: int, data: bytes) -> None:
    """Overwrite bytes in place: the file keeps its size, only its checksum can tell."""
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)
    assert path.stat().st_size == size


@pytest.mark.slow
def test_damaged_checkpoints_are_skipped_reported_and_resume_stays_bit_identical(baseline, tmp_path):
    run_dir = tmp_path / "damaged"
    ckpts = run_dir / "checkpoints"
    r = _run(run_dir, crash_at="step:7")
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert [c.step for c in complete_checkpoints(run_dir)] == [4, 6]

    # 1. 64 zero bytes in the middle of the latest checkpoint's weights: step-4 is used instead,
    #    step-6 is set aside (so it can be written afresh: this run dies at step 7 again).
    weights = ckpts / "step-6" / "trainable.safetensors"
    _damage(weights, weights.stat().st_size // 2, bytes(64))
    r = _run(run_dir, crash_at="step:7")
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert "checkpoint step-6 is damaged: trainable.safetensors checksum mismatch; using step-4" in r.stdout
    assert "resuming from" in r.stdout and "(step 4)" in r.stdout
    assert (ckpts / "damaged-step-6").is_dir()
    assert [c.step for c in complete_checkpoints(run_dir)] == [4, 6]

    # 2. A damaged safetensors header (the JSON after the 8-byte length): the same, no SafetensorError.
    _damage(ckpts / "step-6" / "trainable.safetensors", 8, b"#" * 16)
    r = _run(run_dir)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "checkpoint step-6 is damaged: trainable.safetensors checksum mismatch; using step-4" in r.stdout
    assert "Traceback" not in r.stderr and "SafetensorError" not in r.stderr
    assert json.loads((run_dir / "metrics.json").read_text())["train"]["resumed_from_step"] == 4
    same = (run_dir / "adapter" / "adapter_model.safetensors").read_bytes()
    assert same == (baseline / "adapter" / "adapter_model.safetensors").read_bytes()
    assert [rec["loss"] for rec in _log(run_dir)] == [rec["loss"] for rec in _log(baseline)]

    # 3. Every checkpoint damaged: refused (exit 2), never a silent start from step 0.
    for step in (6, 8):
        _damage(ckpts / f"step-{step}" / "optimizer.pt", 100, bytes(64))
    r = _run(run_dir)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "every checkpoint" in r.stderr and "step-8: optimizer.pt checksum mismatch" in r.stderr
    assert "train.resume=never" in r.stderr and "Traceback" not in r.stderr
    assert sorted(p.name for p in ckpts.iterdir()) == ["damaged-step-6", "step-6", "step-8"]  # nothing moved


# ---------------------------------------------------------------- train.resume=force


@pytest.fixture(scope="module")
def forced(tmp_path_factory) -> Path:
    """Killed after step 5 (checkpoints step-2, step-4), then resumed with a doubled lr."""
    run_dir = tmp_path_factory.mktemp("force") / "run"
    r = _run(run_dir, crash_at="step:5")
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    r = _run(run_dir, "train.lr=2e-3", "train.resume=force")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming from" in r.stdout and "(step 4)" in r.stdout
    return run_dir


# Two more CLI runs (the fixture above). The default suite covers the parts: the lr and schedule
# re-applied after loading a checkpoint (test_train.py::test_reapplied_hyperparameters_follow_the_new_config),
# force accepted / refused key by key (test_train.py::test_resume_with_another_config_is_refused,
# ::test_force_refuses_what_resume_cannot_reapply) and a forced resume training on with a new lr
# (test_exploding_training_stops_and_keeps_the_last_good_checkpoint below).
@pytest.mark.slow
def test_force_trains_with_the_new_lr_it_records(baseline, forced):
    log, base_log = _log(forced), _log(baseline)
    assert [rec["step"] for rec in log] == list(range(1, 9))
    assert [rec["lr"] for rec in log[:4]] == [rec["lr"] for rec in base_log[:4]]  # the part before the resume
    # After it: the same schedule at twice the lr (base_lrs and the current lr re-applied).
    assert [rec["lr"] for rec in log[4:]] == pytest.approx([2 * rec["lr"] for rec in base_log[4:]], rel=1e-12)
    assert "lr: 0.002" in (forced / "config.yaml").read_text()
    new = (forced / "adapter" / "adapter_model.safetensors").read_bytes()
    assert new != (baseline / "adapter" / "adapter_model.safetensors").read_bytes()


def test_force_refuses_keys_it_cannot_honour(baseline, tmp_path):
    run_dir = tmp_path / "refused"
    shutil.copytree(baseline, run_dir)
    # Refused when the run dir is claimed, before anything loads: in-process is enough.
    refused = ["train.lr=2e-3", "adapter.r=4", "train.micro_batch_size=4", "train.resume=force"]
    r = run_cli(*ARGS, *refused, f"hydra.run.dir={run_dir}")
    assert r.returncode == 2, r.stderr[-2000:]
    assert "adapter.r: 16 -> 4 cannot change on resume, even with train.resume=force" in r.stderr
    assert "train.micro_batch_size: 2 -> 4 cannot change on resume" in r.stderr
    assert "train.lr" not in r.stderr and "Traceback" not in r.stderr


def test_exploding_training_stops_and_keeps_the_last_good_checkpoint(baseline, tmp_path):
    """A forced resume (new lr, more steps) from the finished baseline; the new lr is far too high."""
    run_dir = tmp_path / "boom"
    shutil.copytree(baseline, run_dir)
    adapter = (run_dir / "adapter" / "adapter_model.safetensors").read_bytes()
    r = _run(run_dir, "train.lr=1e9", "train.max_steps=10", "train.resume=force")
    assert r.returncode == 1, r.stderr[-2000:]
    assert "step 9: the trainable weights grew" in r.stderr
    assert "train.lr=1e9 is likely too high; the last good checkpoint step-8 is kept" in r.stderr
    assert "Traceback" not in r.stderr
    assert [c.step for c in complete_checkpoints(run_dir)] == [6, 8]  # nothing written from the broken step
    assert (run_dir / "adapter" / "adapter_model.safetensors").read_bytes() == adapter
    assert [rec["step"] for rec in _log(run_dir)] == list(range(1, 9))


def test_tensorboard_events_and_plot_exist(baseline):
    events = list((baseline / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(baseline / "tensorboard"))
    ea.Reload()
    assert [e.step for e in ea.Scalars("train/loss")] == list(range(1, 9))
    png = baseline / "loss.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sigterm_writes_a_checkpoint_and_exits(tmp_path):
    run_dir = tmp_path / "term"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    args = [a for a in ARGS if not a.startswith("train.max_steps")]
    cmd = [sys.executable, "-m", "engine", *args, "train.max_steps=500", "train.save_every=1000", f"hydra.run.dir={run_dir}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = run_dir / "train_log.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and (not log.exists() or len(log.read_text().splitlines()) < 2):
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "interrupted by SIGTERM" in err and "Traceback" not in err
    steps = [c.step for c in complete_checkpoints(run_dir)]
    assert len(steps) == 1 and steps[0] == len(log.read_text().splitlines()) >= 2
