"""Schema of the ``train`` group (no heavy imports: validation runs before anything loads)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from engine.registry import Strict


class TrainSpec(Strict):
    max_steps: int | None = Field(60, ge=1)
    """Optimizer steps (null: run ``epochs`` whole passes)."""
    epochs: float | None = Field(None, gt=0)
    micro_batch_size: int = Field(4, ge=1)
    """Examples per forward pass."""
    grad_accum: int = Field(1, ge=1)
    """Micro-batches per optimizer step; effective batch = micro x accum x processes."""
    lr: float = Field(3e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["linear", "cosine", "constant"] = "cosine"
    max_grad_norm: float | None = Field(1.0, gt=0)
    log_every: int = Field(5, ge=1)
