"""What a GRPO run is handed and what its checkpoints carry (no torch: the stage imports this)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from engine.rl.spec import GrpoSpec
from engine.train.job import Job, Progress

if TYPE_CHECKING:
    from engine.reward import Reward


@dataclass(frozen=True, kw_only=True)
class GrpoJob(Job):
    """One GRPO run: a training Job (``data``: prompts of ``grpo.split``, rendered with its
    template; ``model``: base + a trainable adapter, a PEFT model when grpo.beta > 0), how to
    sample and update, and what an answer is worth."""

    grpo: GrpoSpec
    reward: Reward | None
    """Scores completions: ``score(completions, items) -> [Scored]``; None when the run has no reward."""


@dataclass
class GrpoState(Progress):
    """GRPO's progress (``data_position`` counts prompts taken from the stream)."""

    completions: int = 0
    tokens: int = 0
    """Completion tokens sampled so far."""
