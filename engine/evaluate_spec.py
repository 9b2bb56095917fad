"""Schema of the ``eval`` group (no heavy imports: validation runs before anything loads)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from engine.registry import Strict


class EvalSpec(Strict):
    split: Literal["train", "validation", "test"] = "test"
    max_examples: int | None = Field(40, ge=1)
    max_new_tokens: int = Field(64, ge=1)
    batch_size: int = Field(8, ge=1)
    compare_base: bool = True
    """Also evaluate the base model (adapter disabled) on the same prompts."""
    metrics: list[Literal["exact_match", "token_f1", "rougeL"]] = ["exact_match", "token_f1", "rougeL"]
