"""engine.env: the configured rewards as a Gymnasium environment, for any RL library's loop.

Importing this package registers ``engine/TextReward-v0``:

    import gymnasium, engine.env
    env = gymnasium.make("engine/TextReward-v0", overrides=["data=env_numeric", "reward=format_numeric"], split="test")
    env = gymnasium.make("engine/TextReward-v0", items=items, reward=reward)   # from plain values

  text.py    TextRewardEnv(items, reward): reset -> a prompt, step(completion) -> reward + parts
  config.py  env_from_config(overrides, split=, suite=): compose, validate, prepare (tokenizer only)
See docs/rewards.md.
"""

from __future__ import annotations

import gymnasium

from engine.env.text import TextRewardEnv, prompt_of

ENV_ID = "engine/TextReward-v0"


def make_env(items=None, reward=None, *, overrides=None, **kwargs) -> TextRewardEnv:
    """``gymnasium.make``'s entry point: plain ``items`` + ``reward``, or engine ``overrides``."""
    if items is not None:
        return TextRewardEnv(items, reward, **kwargs)
    from engine.env.config import env_from_config

    return env_from_config(overrides or (), **kwargs)


if ENV_ID not in gymnasium.registry:
    gymnasium.register(id=ENV_ID, entry_point=make_env)

__all__ = ["ENV_ID", "TextRewardEnv", "make_env", "prompt_of"]
