"""Secrets and machine settings: read from the environment or a ``.env`` file, never from config.

Why a separate home: everything in the config is written to the run dir (``config.yaml``,
Hydra's ``.hydra/``, logger configs, reports) so a run can be reproduced and shared. Tokens
must not be. They come from the environment, or from ``.env`` in the directory the command
runs in (``KEY=value`` lines; the environment wins). The config check refuses any config
value that holds one of them, so a ``${oc.env:HF_TOKEN}`` typed into a config stops the run
(exit 2) instead of being written to disk.
"""

from __future__ import annotations

import os
import re
from functools import lru_cache

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """One field per secret; the env var name is what users set (pydantic-settings reads it)."""

    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore", populate_by_name=True)

    hf_token: SecretStr | None = Field(None, validation_alias=AliasChoices("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"))
    """Hugging Face token: gated or private models (huggingface_hub reads HF_TOKEN)."""
    wandb_api_key: SecretStr | None = Field(None, validation_alias="WANDB_API_KEY")
    """Weights & Biases key: only for ``wandb sync`` / online logging (runs log offline)."""
    engine_api_key: SecretStr | None = Field(None, validation_alias="ENGINE_API_KEY")
    """The key clients of engine's HTTP server must send."""


# Settings field -> the env var the libraries that use it read.
EXPORTED = {"hf_token": "HF_TOKEN", "wandb_api_key": "WANDB_API_KEY", "engine_api_key": "ENGINE_API_KEY"}


@lru_cache(maxsize=1)
def settings() -> Settings:
    """Read once per process (the cwd's ``.env`` at the first call)."""
    return Settings()


def export_to_environment() -> None:
    """Put secrets found only in ``.env`` into this process's environment.

    huggingface_hub and wandb read their tokens from the environment; this makes a ``.env``
    entry work for them the same as an exported variable, without engine passing tokens around.
    """
    s = settings()
    for field, var in EXPORTED.items():
        value = getattr(s, field)
        if value is not None and not os.environ.get(var):
            os.environ[var] = value.get_secret_value()


def secret_values() -> dict[str, str]:
    """Env var name -> value of every secret that is set (values of 4+ characters only:
    shorter ones would match ordinary config text and are no secret anyway)."""
    s = settings()
    out = {}
    for field, var in EXPORTED.items():
        value = getattr(s, field)
        if value is not None and len(value.get_secret_value()) >= 4:
            out[var] = value.get_secret_value()
    return out


def keys_holding_secrets(tree: object, prefix: str = "") -> list[tuple[str, str]]:
    """(config key, env var) for every string in ``tree`` (nested dicts/lists) that contains a
    secret's value or refers to a secret's variable (``${oc.env:HF_TOKEN}``, set or not)."""
    found: list[tuple[str, str]] = []
    _walk(tree, prefix, secret_values(), found)
    return found


def _walk(node: object, key: str, secrets: dict[str, str], found: list[tuple[str, str]]) -> None:
    if isinstance(node, dict):
        for k, v in node.items():
            _walk(v, f"{key}.{k}" if key else str(k), secrets, found)
    elif isinstance(node, list | tuple):
        for i, v in enumerate(node):
            _walk(v, f"{key}[{i}]", secrets, found)
    elif isinstance(node, str):
        found.extend((key, var) for var, value in secrets.items() if value in node)
        found.extend((key, m) for m in REFERENCE.findall(node))


# ``oc.env:NAME`` for every variable a secret can come from (pydantic-settings' aliases included).
SECRET_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "WANDB_API_KEY", "ENGINE_API_KEY")
REFERENCE = re.compile(r"oc\.env:\s*['\"]?(" + "|".join(SECRET_VARS) + r")\b")
