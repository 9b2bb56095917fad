"""The ``reward`` group: what a generated answer is worth, as a number, from config alone.

Why a group: the checks and metrics the ``evaluate`` stage already computes (behaviour-suite
checks, numeric error, exact match, F1) are verifiable rewards; naming them in config makes
"the metric you evaluate is the reward you train on" a choice, not code. A reward is used by
the ``train_grpo`` stage (engine/rl/) and the Gymnasium environment (engine/env/).

Interface: ``REWARDS.build(spec)`` returns a ``Reward``:
``reward.score(completions: list[str], items: list[RewardItem]) -> list[Scored]``, one per
completion, where ``Scored.value`` is the weighted total and ``Scored.parts`` the per-term
breakdown (plain floats, for logs and the environment's ``info``).

Kinds (one YAML each in conf/reward/): ``none`` (no reward: the default; a stage that needs one
says so at validation). The other kinds live in this package's modules.
"""

from __future__ import annotations

from engine.reward.spec import REWARDS, NoRewardSpec

__all__ = ["REWARDS", "NoRewardSpec"]
