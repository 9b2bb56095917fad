"""``plugin``: a reward you write in Python, named in config by the name you register it under.

    # my_rewards.py (listed in the config's ``plugins: [my_rewards]``)
    from engine.reward import register_function

    @register_function("short_answer")
    def short_answer(completion, item, *, limit=20):
        return 1.0 if len(completion.split()) <= limit else 0.0

    # python -m engine plugins=[my_rewards] reward=plugin reward.function=short_answer reward.args.limit=10

Config names the function, never an import path (``plugins:`` is the one door for user code,
as for kinds and stages). The function gets the completion, its ``RewardItem`` and ``args``
as keywords, and returns a float or a ``Scored`` (a value with its own breakdown).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import field_validator

from engine.registry import Spec, did_you_mean
from engine.reward.base import PerItem, RewardItem, Scored
from engine.reward.spec import REWARDS

FUNCTIONS: dict[str, Callable[..., Any]] = {}
"""Registered reward functions: name -> function (filled by the ``plugins:`` modules)."""


def register_function(name: str) -> Callable[[Callable], Callable]:
    """Decorator: make ``fn(completion, item, **args) -> float | Scored`` the reward ``name``."""

    def deco(fn: Callable) -> Callable:
        if name in FUNCTIONS and FUNCTIONS[name] is not fn:
            raise ValueError(f"reward function '{name}' is already registered (by {FUNCTIONS[name].__module__})")
        FUNCTIONS[name] = fn
        return fn

    return deco


def unknown_function(name: str) -> str:
    have = sorted(FUNCTIONS)
    listed = ", ".join(have) if have else "none yet"
    return (
        f"no reward function '{name}' is registered{did_you_mean(name, have)}; registered: {listed}. "
        f"Register one with @engine.reward.register_function('{name}') in a module listed in plugins: [...]"
    )


class PluginSpec(Spec):
    function: str
    """Name a ``plugins:`` module registered with ``@engine.reward.register_function(name)``."""
    args: dict[str, Any] = {}
    """Keyword arguments passed to the function on every call (e.g. {limit: 20})."""

    @field_validator("function")
    @classmethod
    def _registered(cls, v: str) -> str:
        # Checked at validation (plugins are imported before the groups are validated).
        if v == "???":  # the shipped preset's placeholder
            have = ", ".join(sorted(FUNCTIONS)) or "none yet"
            raise ValueError(
                f"'???' (not set); name a function registered with @engine.reward.register_function (registered: {have})"
            )
        if v not in FUNCTIONS:
            raise ValueError(unknown_function(v))
        return v


class PluginReward(PerItem):
    def __init__(self, spec: PluginSpec):
        self.name, self.fn, self.args = spec.function, FUNCTIONS[spec.function], dict(spec.args)

    def one(self, completion: str, item: RewardItem) -> Scored:
        out = self.fn(completion, item, **self.args)
        if isinstance(out, Scored):
            return Scored(float(out.value), {k: float(v) for k, v in out.parts.items()})
        try:
            value = float(out)
        except (TypeError, ValueError):
            raise TypeError(f"reward function '{self.name}' returned {type(out).__name__}; return a float or a Scored") from None
        return Scored(value, {self.name: value})


@REWARDS.register("plugin", PluginSpec)
def build_plugin(spec: PluginSpec) -> PluginReward:
    """A user function registered by name from a ``plugins:`` module."""
    return PluginReward(spec)
