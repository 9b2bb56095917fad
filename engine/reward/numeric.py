"""``numeric``: the number the completion states against the reference's, as eval reads them.

The number is read by ``engine.evaluate.metrics.parse_number`` (``pattern``'s first group,
else the last number) and ``within_tol`` is eval's own function on the pair, so the mean of a
``shape: within_tol`` reward over a split equals the evaluate stage's ``within_tol`` there
(with the same ``tolerance`` and ``pattern`` as ``eval.numeric``).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from engine.evaluate.metrics import read_values, within_tol
from engine.evaluate.spec import pattern_compiles
from engine.registry import Spec
from engine.reward.base import PerItem, RewardItem, Scored
from engine.reward.spec import REWARDS


class NumericRewardSpec(Spec):
    shape: Literal["within_tol", "neg_abs_error"] = "within_tol"
    """within_tol: 1 when |answer - reference| <= tolerance, else 0 (eval's within_tol);
    neg_abs_error: -|answer - reference|, clipped at -clip (a graded signal for close misses)."""
    tolerance: float = Field(0.2, ge=0)
    """within_tol's tolerance (eval.numeric.tolerance's default)."""
    clip: float = Field(1.0, gt=0)
    """neg_abs_error never goes below -clip: one wild answer does not swamp a group's advantages."""
    pattern: str | None = None
    """Regex whose first group holds the value (e.g. 'Score:\\s*(\\S+)'); null = the last number (as eval.numeric.pattern)."""
    missing: float = 0.0
    """Reward when the answer (or the reference) states no number; with neg_abs_error set it to -clip
    or lower, else saying nothing beats a wrong guess."""

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, v: str | None) -> str | None:
        return pattern_compiles(v)


class NumericReward(PerItem):
    name = "numeric"

    def __init__(self, spec: NumericRewardSpec):
        self.spec = spec

    def one(self, completion: str, item: RewardItem) -> Scored:
        s = self.spec
        values = read_values([completion], [self.reference_of(item)], tolerance=s.tolerance, pattern=s.pattern)
        if not values.parsed:  # the answer states no number (or the reference none to compare with)
            return Scored(s.missing, {s.shape: s.missing, "parsed": 0.0})
        if s.shape == "within_tol":
            value = float(within_tol(values))
        else:
            (error,) = values.errors
            value = -min(abs(error), s.clip)
        return Scored(value, {s.shape: value, "parsed": 1.0})


@REWARDS.register("numeric", NumericRewardSpec)
def build_numeric(spec: NumericRewardSpec) -> NumericReward:
    """The answer's number vs the reference's: within tolerance (1/0) or minus the clipped error."""
    return NumericReward(spec)
