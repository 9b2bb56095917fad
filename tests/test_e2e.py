"""End to end on the tiny model: the CLI writes a complete, loadable run dir."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from conftest import ASSETS, run_cli, run_engine

QUICK = ["model=tiny", "train.max_steps=2", "eval.max_examples=4", "eval.max_new_tokens=8", "precision=fp32"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("e2e") / "run"
    proc = run_engine(*QUICK, f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "finished" in proc.stdout and str(run_dir) in proc.stdout
    return run_dir


def test_run_dir_has_every_artifact(tiny_run):
    for name in ["config.yaml", "metrics.json", "train_log.jsonl", "report.md", "adapter"]:
        assert (tiny_run / name).exists(), name
    assert (tiny_run / "adapter" / "adapter_model.safetensors").is_file()


def test_metrics_are_nested_by_stage(tiny_run):
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    assert {"prepare_data", "train", "evaluate", "report"} <= set(metrics)
    assert metrics["train"]["steps"] == 2
    assert metrics["prepare_data"]["train_examples"] > 0
    assert 0.0 <= metrics["evaluate"]["test"]["rougeL"] <= 1.0
    assert "rougeL" in metrics["evaluate"]["base"]["test"]


def test_train_log_has_step_loss_lr_speed(tiny_run):
    rows = [json.loads(x) for x in (tiny_run / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["loss"] > 0 and r["lr"] > 0 and r["tokens_per_s"] > 0


def test_resolved_config_is_written(tiny_run):
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(tiny_run / "config.yaml")
    assert cfg.recipe == "lora_smollm2"
    assert cfg.model.kind == "tiny"
    assert cfg.adapter.target_modules[0] == "q_proj"  # interpolations resolved
    # Resolved, but for the packaged sample file: ${sample:NAME} resolves wherever the record is read.
    text = (tiny_run / "config.yaml").read_text()
    assert re.findall(r"^  path: (.*)$", text, re.M) == ["${sample:env_science_qa.jsonl}"]
    assert "${" not in text.replace("${sample:env_science_qa.jsonl}", "")


def test_adapter_loads_with_peft(tiny_run):
    import torch
    from peft import PeftModel

    from engine.model import TinySpec, build_tiny

    base, tok = build_tiny(TinySpec(kind="tiny"))
    model = PeftModel.from_pretrained(base, tiny_run / "adapter")
    out = model(**tok("hello", return_tensors="pt"))
    assert torch.isfinite(out.logits).all()


def test_report_compares_base_and_finetuned(tiny_run):
    text = (tiny_run / "report.md").read_text()
    assert "| metric | base | fine-tuned | change |" in text
    assert "rougeL" in text


@pytest.mark.slow
def test_default_run_dir_is_outputs_recipe_timestamp(tmp_path):
    proc = run_engine("model=tiny", "train.max_steps=1", "stages=[prepare_data,train]", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    dirs = list((tmp_path / "outputs" / "lora_smollm2").iterdir())
    assert len(dirs) == 1 and re.fullmatch(r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d", dirs[0].name)
    assert (dirs[0] / "adapter" / "adapter_config.json").is_file()


@pytest.mark.slow
def test_multirun_sweeps_any_key(tmp_path):
    proc = run_engine(
        "-m",
        "model=tiny",
        "train.max_steps=1",
        "adapter.r=4,8",
        "stages=[prepare_data,train]",
        f"hydra.sweep.dir={tmp_path}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = [d for d in tmp_path.iterdir() if d.name.isdigit()]
    ranks = sorted(json.loads((d / "adapter" / "adapter_config.json").read_text())["r"] for d in jobs)
    assert ranks == [4, 8]


def test_plugin_registers_a_stage(tmp_path):
    env_path = os.environ.get("PYTHONPATH", "")
    os.environ["PYTHONPATH"] = f"{ASSETS / 'plugins'}{os.pathsep}{env_path}"
    try:
        proc = run_engine("model=tiny", "plugins=[hello_stage]", "stages=[hello]", f"hydra.run.dir={tmp_path}")
    finally:
        os.environ["PYTHONPATH"] = env_path
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "hello.txt").read_text() == "hello from lora_smollm2\n"
    assert json.loads((tmp_path / "metrics.json").read_text())["hello"]["greeted"] is True


def test_missing_hub_model_fails_fast_offline(tmp_path):
    import time

    t0 = time.time()
    proc = run_cli("recipe=lora_tinyllama", "stages=[prepare_data]", f"hydra.run.dir={tmp_path}")
    assert proc.returncode != 0
    assert "TinyLlama" in proc.stderr and "local HF cache" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert time.time() - t0 < 60


def test_local_dir_that_is_not_a_model_is_a_clear_error(tmp_path):
    from engine.errors import UserError
    from engine.model import resolve_hf

    with pytest.raises(UserError, match="no config.json"):
        resolve_hf(str(tmp_path))
