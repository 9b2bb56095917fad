"""Schema of the ``grpo`` group (no heavy imports: validation runs before anything loads)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from engine.registry import Strict


class GrpoSpec(Strict):
    split: Literal["train", "validation", "test"] = "train"
    """Data split the training prompts come from (the data group's prepared splits)."""
    group_size: int = Field(4, ge=2)
    """Completions sampled per prompt; advantages are normalised within each group."""
    prompts_per_step: int = Field(2, ge=1)
    """Prompts per optimizer step (each gives group_size completions)."""
    max_new_tokens: int = Field(48, ge=1)
    """Longest sampled answer; sampling also stops at the template's end of turn."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature: higher = more varied answers in a group (more to learn from, more noise)."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling (1.0 = off); top-k is always off."""
    beta: float = Field(0.04, ge=0)
    """KL penalty to the reference (the base with the adapter disabled); 0 = no reference pass."""
    clip_eps: float = Field(0.2, gt=0)
    """PPO-style clip of the probability ratio (matters when iterations > 1)."""
    iterations: int = Field(1, ge=1)
    """Policy updates per batch of generated completions."""
    scale_rewards: bool = True
    """Divide each group's advantages by its reward std (false: only subtract the group mean)."""
