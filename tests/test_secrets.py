"""Secrets come from the environment or ``.env`` (engine/settings.py) and never reach a run dir."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import QUICK_TRAIN, compose, run_engine

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


@pytest.mark.slow
def test_secrets_from_env_and_dotenv_never_reach_the_run_dir(tmp_path):
    (tmp_path / ".env").write_text(f"WANDB_API_KEY={WANDB}\nENGINE_API_KEY={API}\n")
    os.environ["HF_TOKEN"] = HF
    try:
        proc = run_engine(
            *QUICK_TRAIN,
            "train.max_steps=2",
            "train.loggers=[tensorboard]",
            "eval.max_examples=2",
            "eval.max_new_tokens=4",
            "eval.metrics=[exact_match,token_f1]",
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
