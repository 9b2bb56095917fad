"""``checks`` and ``suite``: the behaviour-suite checks (engine/evaluate/suites.py) as rewards.

``checks`` applies one set of checks (max_words, contains, numbered_list, valid_json,
refuses ...) to every completion, whatever the prompt: a format reward for any data set.
``suite`` scores prompts that come from a behaviour suite against *their own* case's checks,
exactly as ``engine.evaluate.suites.check`` decides for the evaluate stage, so the mean
``suite`` reward over a suite's cases is that suite's pass rate in metrics.json.
"""

from __future__ import annotations

import re

from pydantic import Field, ValidationError, field_validator, model_validator

from engine.errors import UserError
from engine.evaluate.spec import DEFAULT_REFUSALS, suites_exist
from engine.evaluate.suites import Case, Checks, check
from engine.registry import Spec
from engine.reward.base import PerItem, RewardItem, Scored
from engine.reward.spec import REWARDS, validate_nested


def active_checks(checks: Checks) -> list[str]:
    """The checks a ``Checks`` sets, in suites.check's order and by its rule (unset = skipped)."""
    out = []
    for name in Checks.model_fields:
        value = getattr(checks, name)
        if value is None or value == [] or (value is False and name == "preserves_numbers"):
            continue
        out.append(name)
    return out


def patterns_compile(v: list[str]) -> list[str]:
    for i, p in enumerate(v):
        try:
            re.compile(p)
        except re.error as e:
            raise ValueError(f"[{i}] {p!r} is not a valid regular expression: {e}") from None
    return v


def _score(failed: list[str], active: list[str], all_or_nothing: bool) -> Scored:
    parts = {name: float(name not in failed) for name in active}
    if all_or_nothing or not active:
        value = float(not failed)
    else:
        value = sum(parts.values()) / len(parts)
    return Scored(value, parts)


class ChecksRewardSpec(Spec):
    checks: Checks
    """The checks every completion must pass (the keys of a suite case's ``checks``: max_words,
    contains, numbered_list, bullet_list, valid_json, refuses ...)."""
    all_or_nothing: bool = False
    """true: 1 only when every check passes (a suite case's pass/fail); false: the share passed."""
    refusal_patterns: list[str] = DEFAULT_REFUSALS
    """Case-insensitive regexes that count as a refusal (for ``refuses``); eval's by default."""

    @field_validator("refusal_patterns")
    @classmethod
    def _patterns_compile(cls, v: list[str]) -> list[str]:
        return patterns_compile(v)

    @field_validator("checks", mode="before")
    @classmethod
    def _checks_keys(cls, v):
        # An unknown check is named with the valid checks, at its full key (reward.checks.<key>).
        checks, errors = validate_nested(Checks, v)
        if errors:
            raise ValidationError.from_exception_data("checks", errors)
        return checks

    @model_validator(mode="after")
    def _some_check(self):
        if not active_checks(self.checks):
            valid = ", ".join(Checks.model_fields)
            raise ValueError(f"checks: none is set, so every answer would score 1; set at least one of {valid}")
        return self


class ChecksReward(PerItem):
    name = "checks"

    def __init__(self, spec: ChecksRewardSpec):
        self.spec = spec
        self.active = active_checks(spec.checks)

    def one(self, completion: str, item: RewardItem) -> Scored:
        # The fact checks (preserves_numbers) read the case's prompt/source: the item's own
        # case when it has one, else its user turns.
        if item.case is not None:
            case = item.case.model_copy(update={"checks": self.spec.checks})
        else:
            prompt = "\n\n".join(m["content"] for m in item.messages if m.get("role") == "user")
            case = Case(id=item.id or "item", prompt=prompt, checks=self.spec.checks)
        failed = check(completion, case, self.spec.refusal_patterns)
        return _score(failed, self.active, self.spec.all_or_nothing)


@REWARDS.register("checks", ChecksRewardSpec)
def build_checks(spec: ChecksRewardSpec) -> ChecksReward:
    """One set of suite checks on every completion: the share passed (or 1/0)."""
    return ChecksReward(spec)


class SuiteRewardSpec(Spec):
    suites: list[str] = Field(min_length=1)
    """Behaviour suites whose prompts this reward scores (shipped: format, facts, safety; or a
    path to a suite YAML): where the environment and a stage draw their prompts from."""
    all_or_nothing: bool = True
    """true: 1 when the case passes, as eval counts it; false: the share of its checks passed."""
    refusal_patterns: list[str] = DEFAULT_REFUSALS
    """Case-insensitive regexes that count as a refusal; keep them equal to eval.refusal_patterns
    for the reward to be the evaluate stage's number."""

    @field_validator("refusal_patterns")
    @classmethod
    def _patterns_compile(cls, v: list[str]) -> list[str]:
        return patterns_compile(v)

    @field_validator("suites")
    @classmethod
    def _suites_exist(cls, v: list[str]) -> list[str]:
        return suites_exist(v)


class SuiteReward(PerItem):
    name = "suite"

    def __init__(self, spec: SuiteRewardSpec):
        self.spec = spec

    def one(self, completion: str, item: RewardItem) -> Scored:
        if item.case is None:
            raise UserError(
                f"reward suite: item '{item.id}' is not a behaviour-suite prompt (no case to check against); "
                "draw the prompts from the suite (engine.reward.items_from_suite, or the environment's suite=), "
                "or use reward kind checks to apply one set of checks to any prompt"
            )
        failed = check(completion, item.case, self.spec.refusal_patterns)
        return _score(failed, active_checks(item.case.checks), self.spec.all_or_nothing)


@REWARDS.register("suite", SuiteRewardSpec)
def build_suite(spec: SuiteRewardSpec) -> SuiteReward:
    """Suite prompts scored by their own case's checks: 1 when the case passes (eval's pass/fail)."""
    return SuiteReward(spec)
