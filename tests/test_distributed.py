"""Data-parallel on CPU: `accelerate launch` with 2 gloo processes vs 1 process, same global batch.

The 2-process run gets no hydra.run.dir on purpose: engine.cli.launch_rank must give both
ranks rank 0's time-stamped dir, and only rank 0 writes files there.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY, run_engine

COMMON = [
    *TINY,
    "stages=[prepare_data,train]",
    "precision=fp32",
    "device=cpu",
    "train.max_steps=4",
    "train.grad_accum=1",
    "train.warmup_steps=0",
    "train.save_every=2",
    "adapter.dropout=0.0",  # dropout masks would differ by rank; the rest must match
]


def _log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_cpu_processes_match_one_process(tmp_path):
    one = tmp_path / "one"
    r = run_engine(*COMMON, "train.micro_batch_size=4", f"hydra.run.dir={one}")
    assert r.returncode == 0, r.stderr[-3000:]

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(ROOT)}
    cmd = [
        "accelerate", "launch", "--config_file", str(ROOT / "engine/conf/accelerate/cpu_2proc.yaml"),
        "-m", "engine", *COMMON, "train.micro_batch_size=2",
    ]  # fmt: skip
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]

    run_dirs = list((tmp_path / "outputs" / "lora_smollm2").iterdir())
    assert len(run_dirs) == 1, f"ranks disagreed on the run dir: {run_dirs}"
    two = run_dirs[0]
    for name in ("config.yaml", "metrics.json", "train_log.jsonl", "adapter/adapter_model.safetensors", "loss.png"):
        assert (two / name).is_file(), name
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["step-2", "step-4"]
    state = json.loads((two / "checkpoints" / "step-4" / "state.json").read_text())
    assert state["processes"] == 2 and state["data_position"] == 4
    metrics = json.loads((two / "metrics.json").read_text())["train"]
    assert metrics["processes"] == 2 and metrics["steps"] == 4

    a, b = _log(one), _log(two)
    assert [x["step"] for x in b] == [1, 2, 3, 4]
    # Same examples per step; the loss is a mean of per-rank means vs one mean over all tokens.
    for x, y in zip(a, b, strict=True):
        assert y["tokens"] == x["tokens"]
        assert y["loss"] == pytest.approx(x["loss"], rel=2e-3)  # measured: <= 1.2e-4


# ---------------------------------------------------------------- sharded (FSDP/DeepSpeed) checkpoints


def test_accelerate_state_checkpoints_resume_bit_identically(tmp_path, monkeypatch):
    """The FSDP/DeepSpeed checkpoint path on one CPU process: accelerate's save_state/load_state
    inside our atomic, checksummed step-K layout. Stopped after step 5, resumed from step-4, it
    ends with the same adapter bytes as an uninterrupted plain run.

    Why not real FSDP here: accelerate 1.15 turns an FSDP launch on CPU into MULTI_CPU (its
    FSDP switch only follows GPU-like backends), although torch's FSDP2 runs on gloo; the
    GPU test below runs the real thing.
    """
    from accelerate.state import AcceleratorState
    from conftest import QUICK_TRAIN, compose

    import engine.train.checkpoint as ckpt_io
    import engine.train.loop as loop
    from engine.pipeline import run

    cfg = compose([*QUICK_TRAIN, "stages=[prepare_data,train]", "train.max_steps=6", "train.save_every=2"])
    AcceleratorState._reset_state(reset_partial_state=True)
    run(cfg, tmp_path / "plain")

    def die_after_step_5(where: str, step: int) -> None:
        if (where, step) == ("step", 5):
            raise RuntimeError("killed")

    monkeypatch.setattr(loop, "uses_accelerate_state", lambda acc: True)
    monkeypatch.setattr(ckpt_io, "crash_point", die_after_step_5)
    sharded = tmp_path / "sharded"
    with pytest.raises(RuntimeError, match="killed"):
        run(cfg, sharded)
    step4 = sharded / "checkpoints" / "step-4"
    files = json.loads((step4 / "state.json").read_text())["files"]
    assert "trainable.safetensors" not in files and "accelerate/model.safetensors" in files
    assert all(len(entry["sha256"]) == 64 for entry in files.values())

    monkeypatch.setattr(ckpt_io, "crash_point", lambda where, step: None)
    AcceleratorState._reset_state(reset_partial_state=True)
    ctx = run(cfg, sharded)
    assert ctx.metrics["train"]["resumed_from_step"] == 4
    same = (sharded / "adapter" / "adapter_model.safetensors").read_bytes()
    assert same == (tmp_path / "plain" / "adapter" / "adapter_model.safetensors").read_bytes()
    assert [x["loss"] for x in _log(sharded)] == [x["loss"] for x in _log(tmp_path / "plain")]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_fsdp_writes_checkpoints_and_resumes(tmp_path):
    """FSDP over 2 GPUs: killed after step 3, resumed from step-2, same losses and adapter as an uninterrupted run."""
    from safetensors.torch import load_file

    args = [*COMMON, "train.micro_batch_size=2", "precision=bf16", "device=auto"]
    args = [a for a in args if a not in ("precision=fp32", "device=cpu")]
    fsdp = str(ROOT / "engine/conf/accelerate/fsdp.yaml")

    def launch(run_dir: Path, crash_at: str | None = None) -> subprocess.CompletedProcess:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(ROOT)}
        env.pop("ENGINE_CRASH_AT", None)
        if crash_at:
            env["ENGINE_CRASH_AT"] = crash_at
        cmd = ["accelerate", "launch", "--config_file", fsdp, "--num_processes", "2", "-m", "engine", *args]
        cmd.append(f"hydra.run.dir={run_dir}")
        return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)

    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    assert launch(whole).returncode == 0
    assert launch(resumed, crash_at="step:3").returncode != 0
    files = json.loads((resumed / "checkpoints" / "step-2" / "state.json").read_text())["files"]
    assert any(name.startswith("accelerate/") for name in files)
    r = launch(resumed)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((resumed / "metrics.json").read_text())["train"]["resumed_from_step"] == 2
    assert [x["loss"] for x in _log(resumed)] == pytest.approx([x["loss"] for x in _log(whole)], rel=1e-3)
    a = load_file(str(whole / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(resumed / "adapter" / "adapter_model.safetensors"))
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-3, atol=1e-5, msg=name)
