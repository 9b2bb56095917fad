"""Schema of the ``data`` group (kept apart from the loaders so validation stays light)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from engine.registry import Spec


class SplitSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    train: float = Field(0.8, ge=0, le=1)
    validation: float = Field(0.1, ge=0, le=1)
    test: float = Field(0.1, ge=0, le=1)

    @model_validator(mode="after")
    def _sums_to_one(self):
        if abs(self.train + self.validation + self.test - 1.0) > 1e-6:
            raise ValueError("train + validation + test must sum to 1")
        return self


class DataSpec(Spec):
    path: str
    """A data file (json, jsonl, csv, parquet)."""
    template: str = "model"
    """Chat template: model (the tokenizer's own), chatml, alpaca, ..."""
    system_prompt: str | None = None
    """Prepended as a system message when the row has none."""
    fields: dict[str, str] = {}
    """Column mapping for other names, e.g. {prompt: q, response: a}."""
    max_length: int = Field(512, ge=8)
    """Longer examples are truncated (counted in metrics)."""
    train_on_prompt: bool = False
    """False: loss only on response/assistant tokens."""
    split: SplitSpec = SplitSpec()
    seed: int | None = None
    """Split seed; null = the run's seed."""
    limit: int | None = Field(None, ge=1)
    """Use only the first N rows (quick experiments)."""

    @field_validator("path")
    @classmethod
    def _exists(cls, v: str) -> str:
        if not Path(v).expanduser().exists():
            raise ValueError(f"no such file or directory: {v}")
        return v
