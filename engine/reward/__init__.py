"""The ``reward`` group: what a generated answer is worth, as a number, from config alone.

Why a group: the checks and metrics the ``evaluate`` stage already computes (behaviour-suite
checks, numeric error, exact match, F1) are verifiable rewards; naming them in config makes
"the metric you evaluate is the reward you train on" a choice, not code. A reward is used by
the ``train_grpo`` stage (engine/rl/) and the Gymnasium environment (engine/env/).

Interface (base.py): ``REWARDS.build(spec)`` returns a ``Reward``:
``reward.score(completions: list[str], items: list[RewardItem]) -> list[Scored]``, one per
completion, where ``Scored.value`` is the weighted total and ``Scored.parts`` the per-term
breakdown (plain floats, for logs and the environment's ``info``). ``items_from_examples``
and ``items_from_suite`` make the items from a prepared data split or a behaviour suite.

Kinds (one YAML each in conf/reward/; docs/rewards.md):
  none         no reward: the default; a stage that needs one says so at validation
  exact_match  1/0, the answer equals the reference (eval's exact_match)          text.py
  f1           token F1 against the reference (eval's token_f1)                   text.py
  numeric      the answer's number vs the reference's: within_tol or -|error|     numeric.py
  checks       one set of suite checks on every answer: share passed (or 1/0)     checks.py
  suite        suite prompts by their own case's checks: eval's pass/fail         checks.py
  plugin       a function registered with ``register_function`` in a plugin      plugin.py
  combined     weighted sum of named terms, each any of the above                 combined.py
Every kind module is light (no torch): validation imports this package before anything loads.
"""

from __future__ import annotations

from engine.reward import checks as _checks  # noqa: F401  (registers checks, suite)
from engine.reward import combined as _combined  # noqa: F401  (registers combined)
from engine.reward import numeric as _numeric  # noqa: F401  (registers numeric)
from engine.reward import text as _text  # noqa: F401  (registers exact_match, f1)
from engine.reward.base import Reward, RewardItem, Scored, items_from_examples, items_from_suite
from engine.reward.plugin import FUNCTIONS, register_function
from engine.reward.spec import REWARDS, NoRewardSpec

__all__ = [
    "FUNCTIONS",
    "REWARDS",
    "NoRewardSpec",
    "Reward",
    "RewardItem",
    "Scored",
    "items_from_examples",
    "items_from_suite",
    "register_function",
]
