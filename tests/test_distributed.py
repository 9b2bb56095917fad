"""Data-parallel on CPU: `accelerate launch` with 2 gloo processes vs 1 process, same global batch.

The 2-process run gets no hydra.run.dir on purpose: engine.cli.share_run_dir must give both
ranks rank 0's time-stamped dir, and only rank 0 writes files there.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
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


def test_two_cpu_processes_match_one_process(tmp_path):
    one = tmp_path / "one"
    r = run_engine(*COMMON, "train.micro_batch_size=4", f"hydra.run.dir={one}")
    assert r.returncode == 0, r.stderr[-3000:]

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(ROOT)}
    cmd = [
        "accelerate", "launch", "--config_file", str(ROOT / "conf/accelerate/cpu_2proc.yaml"),
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
