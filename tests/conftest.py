"""Test fixtures: offline, tiny by construction (random-init model, tiny tokenizer)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
CONF = str(ROOT / "engine" / "conf")
ASSETS = ROOT / "tests" / "assets"
TINY_TOKENIZER = ROOT / "engine" / "assets" / "tiny_tokenizer"
TINY = ["model=tiny"]
# A few fast CPU training steps on the tiny model: small batches, no warm-up, a high lr so
# parameters visibly move, fp32 so results do not depend on the machine's bf16 support.
QUICK_TRAIN = [
    *TINY,
    "train.micro_batch_size=2",
    "train.grad_accum=1",
    "train.warmup_steps=0",
    "train.lr=1e-2",
    "device=cpu",
    "precision=fp32",
]


def compose(overrides: list[str], check: bool = True):
    """Compose conf/ with Hydra's compose API (as the CLI does) and validate."""
    from engine.cli import compose_and_validate
    from engine.config import register_resolvers

    register_resolvers()
    argv = [*overrides]
    return compose_and_validate(argv, CONF, check=check)


def run_engine(*args: str, cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """``python -m engine ARGS`` in a subprocess: exit code, stdout and stderr as a user sees them."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, "-m", "engine", *args],
        cwd=cwd or ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return tmp_path / "run"
