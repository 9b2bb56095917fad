"""Reinforcement learning from rewards: the GRPO loop the ``train_grpo`` stage runs.

It sits above ``engine.reward`` (what a completion is worth) and beside ``engine.env`` (the
same rewards as a Gymnasium environment); see docs/rl.md.

  spec.py       the ``grpo`` group's schema (sampling and update knobs)
  job.py        what a run is handed (GrpoJob: typed specs, the reward) and its progress
  grpo.py       the loop: set_up / grpo_step / finish, on engine/train's shared scaffold
  sampling.py   the seeded prompt stream and one step's groups of sampled completions
  objective.py  group-normalised advantages, completion log-probs, the clipped surrogate + k3 KL

Importing this package (and job.py, spec.py) loads no torch: ``train_grpo`` loads the loop
when it is called.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine.rl.job import GrpoJob


def train_grpo(job: GrpoJob) -> dict:
    """One GRPO run (grpo.py); returns its metrics."""
    from engine.rl.grpo import train_grpo as run

    return run(job)
