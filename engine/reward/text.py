"""``exact_match`` and ``f1``: the evaluate stage's text metrics against the item's reference.

The same functions as ``eval.metrics`` exact_match / token_f1 (engine/evaluate/metrics.py),
so the mean reward over a split is the metric the evaluate stage reports on it.
"""

from __future__ import annotations

from engine.evaluate.metrics import exact_match, token_f1
from engine.registry import Spec
from engine.reward.base import PerItem, RewardItem, Scored
from engine.reward.spec import REWARDS


class ExactMatchSpec(Spec):
    """1.0 when the completion equals the reference after SQuAD normalisation, else 0.0."""


class F1Spec(Spec):
    """Token F1 of the completion against the reference (normalised bags of words), in [0, 1]."""


class _Metric(PerItem):
    def __init__(self, name: str, fn):
        self.name, self.fn = name, fn

    def one(self, completion: str, item: RewardItem) -> Scored:
        value = float(self.fn(completion, self.reference_of(item)))
        return Scored(value, {self.name: value})


@REWARDS.register("exact_match", ExactMatchSpec)
def build_exact_match(spec: ExactMatchSpec) -> _Metric:
    """1/0: the completion equals the reference (eval's exact_match)."""
    return _Metric("exact_match", exact_match)


@REWARDS.register("f1", F1Spec)
def build_f1(spec: F1Spec) -> _Metric:
    """Token F1 against the reference (eval's token_f1)."""
    return _Metric("f1", token_f1)
