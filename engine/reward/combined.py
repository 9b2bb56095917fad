"""``combined``: several rewards, weighted and summed, each term configured like its own kind.

    kind: combined
    terms:
      accuracy: {kind: numeric, weight: 1.0, tolerance: 0.1}
      format: {kind: checks, weight: 0.5, checks: {contains: ["Score:"], max_words: 6}}

value = sum of weight x term value; parts = each term's value under its name and the term's own
parts under ``<name>.<part>`` (``format.max_words``), so a log shows which part moved.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, ValidationError, field_validator

from engine.registry import Spec, Strict, did_you_mean
from engine.reward.base import RewardItem, Scored
from engine.reward.spec import REWARDS, custom_error, validate_nested


class Term(Strict):
    weight: float = 1.0
    """Multiplies the term's value in the total (negative = a penalty)."""
    spec: Spec
    """The term's own reward spec (any kind but none)."""


def validate_terms(terms: Any) -> tuple[Any, list[dict]]:
    """Each term's spec by its kind's schema, and the problems as pydantic line errors located at
    ``<name>.<key>`` (validation prefixes ``reward.terms.``), so each names its full key."""
    errors: list[dict] = []
    out: dict[str, Term] = {}
    if not isinstance(terms, dict):
        return terms, errors  # the field's type check says what is wrong
    for name, node in terms.items():
        if not isinstance(node, dict):
            errors.append(
                custom_error((name,), "should be a mapping with a kind and a weight, e.g. {kind: f1, weight: 1.0}", node)
            )
            continue
        node = dict(node)
        weight = node.pop("weight", 1.0)
        kind = node.get("kind")
        if kind not in REWARDS or kind == "none":
            valid = [k for k in REWARDS.keys() if k != "none"]
            msg = f"unknown reward kind {kind!r}{did_you_mean(str(kind), valid)}; valid: {', '.join(valid)}"
            errors.append(custom_error((name, "kind"), msg, kind))
            continue
        spec, problems = validate_nested(REWARDS.get(kind).spec, node, (name,), extra=("weight",))
        errors += problems
        if not isinstance(weight, int | float) or isinstance(weight, bool):
            errors.append(custom_error((name, "weight"), f"should be a number (got {weight!r})", weight))
        elif spec is not None:
            out[name] = Term(weight=weight, spec=spec)
    return out, errors


class CombinedSpec(Spec):
    terms: dict[str, Term] = Field(min_length=1)
    """Term name -> {kind, weight, ...that kind's keys}; the reward is the weighted sum."""

    @field_validator("terms", mode="before")
    @classmethod
    def _terms(cls, terms: Any) -> Any:
        out, errors = validate_terms(terms)
        if errors:
            raise ValidationError.from_exception_data("terms", errors)
        return out


class CombinedReward:
    """Every term scores the whole batch (a term may batch internally), then the weighted sum."""

    def __init__(self, terms: dict[str, tuple[float, Any]]):
        self.terms = terms

    def score(self, completions: list[str], items: list[RewardItem]) -> list[Scored]:
        totals = [0.0] * len(completions)
        parts: list[dict[str, float]] = [{} for _ in completions]
        for name, (weight, reward) in self.terms.items():
            for i, s in enumerate(reward.score(completions, items)):
                totals[i] += weight * s.value
                parts[i][name] = s.value
                parts[i].update({f"{name}.{k}": v for k, v in s.parts.items()})
        return [Scored(t, p) for t, p in zip(totals, parts, strict=True)]


@REWARDS.register("combined", CombinedSpec)
def build_combined(spec: CombinedSpec) -> CombinedReward:
    """Weighted sum of named terms, each any reward kind with its own keys."""
    return CombinedReward({name: (t.weight, REWARDS.build(t.spec)) for name, t in spec.terms.items()})
