"""A run imports only what it uses: the lean first import of transformers and peft (engine/speed/imports.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest

BUILD = """
import importlib.util, sys
from engine.speed.imports import lean_call
from engine.adapter import build_for_run
from conftest import compose
cfg = compose(["model=tiny", "stages=[prepare_data]", *sys.argv[2:]])
(model, tok), notice = lean_call(
    lambda: build_for_run(cfg.model, cfg.quantization, cfg.adapter, progress=False),
    quantized=cfg.quantization.kind != "none",
)
import peft.import_utils as p
installed = importlib.util.find_spec("bitsandbytes") is not None
print("LOADED", sorted(m for m in ("bitsandbytes", "scipy") if m in sys.modules))
print("NOTICE", notice)
print("BNB_SEEN_AFTER", p.is_bnb_available() == installed)
print("LORA", type(model).__name__)
"""


def _build(tmp_path, *overrides: str) -> dict[str, str]:
    from conftest import ROOT

    script = tmp_path / "build.py"
    script.write_text(BUILD)
    env_path = f"{ROOT / 'tests'}"
    out = subprocess.run(
        [sys.executable, str(script), "x", *overrides],
        capture_output=True,
        text=True,
        timeout=300,
        env={**__import__("os").environ, "PYTHONPATH": env_path, "HF_HUB_OFFLINE": "1"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return dict(line.split(" ", 1) for line in out.stdout.splitlines() if line.split(" ", 1)[0].isupper())


def test_an_unquantized_lora_build_loads_neither_bitsandbytes_nor_scipy(tmp_path):
    got = _build(tmp_path)
    assert got["LOADED"] == "[]"
    assert got["NOTICE"] == "None"
    assert got["BNB_SEEN_AFTER"] == "True"  # a later quantized build in this process still finds it
    assert got["LORA"] == "PeftModelForCausalLM"


def test_switched_off_it_imports_as_the_libraries_do(tmp_path, monkeypatch):
    monkeypatch.setenv("ENGINE_LEAN_IMPORTS", "0")
    got = _build(tmp_path)
    if __import__("importlib").util.find_spec("bitsandbytes") is None:
        pytest.skip("bitsandbytes is not installed: nothing to compare")
    assert "bitsandbytes" in got["LOADED"]
