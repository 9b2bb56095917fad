"""``TextRewardEnv``: one prompt per episode, one completion per step, the configured reward back.

Why an environment: any RL library that speaks Gymnasium (a PPO/GRPO loop, a bandit, a
search over prompts) can then train or evaluate against the same rewards the ``evaluate``
stage reports, with no engine code in its loop. An episode is a single turn:

    obs, info = env.reset(seed=0)      # obs: the prompt text; info: messages, id, reference
    obs, reward, terminated, truncated, info = env.step(completion)   # terminated=True
    info["parts"]                      # the per-check / per-term breakdown of the reward

Spaces: both are ``gymnasium.spaces.Text``; the charset covers every prompt and reference plus
printable ASCII, so observations are always in their space. ``step`` accepts any string: a
model's completion is not sampled from the action space.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from typing import Any

import gymnasium
from gymnasium import spaces

from engine.errors import ConfigError, UserError
from engine.reward.base import Reward, RewardItem


def prompt_of(item: RewardItem) -> str:
    """The observation for an item without a rendered prompt: its last user turn."""
    users = [m["content"] for m in item.messages if m.get("role") == "user"]
    return users[-1] if users else ""


class TextRewardEnv(gymnasium.Env):
    """Prompts drawn from ``items`` (seeded by ``reset``), completions scored by ``reward``."""

    metadata = {"render_modes": []}

    def __init__(
        self,
        items: Sequence[RewardItem],
        reward: Reward | None,
        *,
        prompts: Sequence[str] | None = None,
        max_chars: int = 4096,
    ):
        """Args:
        items: the prompts (``engine.reward.items_from_examples`` / ``items_from_suite``).
        reward: a built reward (``REWARDS.build(spec)``); ``None`` (kind none) is refused.
        prompts: the observation per item, e.g. each prompt rendered with the model's chat
            template (the config path does this); default: the item's last user turn.
        max_chars: the action space's length limit (a sampled action, not a cap on ``step``).
        """
        if reward is None:
            raise ConfigError("reward: none gives no reward to return; choose a preset, e.g. reward=format_numeric")
        if not items:
            raise UserError("the environment has no prompts: the data split (or suite) it was given is empty")
        self.items = list(items)
        self.reward = reward
        self.prompts = list(prompts) if prompts is not None else [prompt_of(i) for i in self.items]
        if len(self.prompts) != len(self.items):
            raise ValueError(f"{len(self.prompts)} prompts for {len(self.items)} items")
        seen = "".join(self.prompts) + "".join(i.reference or "" for i in self.items)
        charset = frozenset(string.printable) | frozenset(seen)
        longest = max(len(p) for p in self.prompts)
        self.observation_space = spaces.Text(max_length=max(longest, 1), min_length=0, charset=charset)
        self.action_space = spaces.Text(max_length=max_chars, min_length=0, charset=charset)
        self._index: int | None = None

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[str, dict]:
        """A prompt drawn with ``self.np_random`` (seeded by ``seed``); ``options={"index": i}``
        or ``{"id": ...}`` picks one (to score the same prompt as another loop did)."""
        super().reset(seed=seed)
        options = options or {}
        if "index" in options:
            self._index = int(options["index"]) % len(self.items)
        elif "id" in options:
            ids = [i.id for i in self.items]
            if options["id"] not in ids:
                raise KeyError(f"no prompt with id {options['id']!r}; ids look like {ids[:3]}")
            self._index = ids.index(options["id"])
        else:
            self._index = int(self.np_random.integers(len(self.items)))
        item = self.items[self._index]
        return self.prompts[self._index], {"id": item.id, "messages": item.messages, "reference": item.reference}

    def step(self, action: str) -> tuple[str, float, bool, bool, dict]:
        """Score ``action`` (the completion) for the current prompt; the episode ends here."""
        if self._index is None:
            raise RuntimeError("call reset() before step(): an episode starts with a prompt")
        if not isinstance(action, str):
            raise TypeError(f"the action is the completion text (a str), got {type(action).__name__}")
        item = self.items[self._index]
        (scored,) = self.reward.score([action], [item])
        info = {"id": item.id, "reference": item.reference, "parts": dict(scored.parts)}
        return self.prompts[self._index], float(scored.value), True, False, info
