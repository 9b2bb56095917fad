"""Schema of the ``reward`` group (light: validation imports it before anything loads)."""

from __future__ import annotations

from engine.registry import Registry, Spec

REWARDS = Registry("reward")


class NoRewardSpec(Spec):
    """No reward configured: stages that need one (train_grpo, the environment) refuse at validation."""


@REWARDS.register("none", NoRewardSpec)
def build_none(spec: NoRewardSpec):
    """No reward (the default)."""
    return None
