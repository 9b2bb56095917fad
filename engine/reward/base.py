"""What every reward kind shares: the item it scores, the score it returns, the protocol.

A reward sees plain values only (the prompt's messages, the reference answer, a suite case),
never a model or a run context: the ``train_grpo`` stage, the Gymnasium environment and a
test all call the same ``score`` on the same texts and get the same numbers.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from engine.errors import UserError


@dataclass(frozen=True)
class RewardItem:
    """One prompt and what its answer is judged against."""

    messages: list[dict]
    """The prompt conversation (system/user turns) as the data group made it."""
    reference: str | None = None
    """The reference answer (the example's assistant turn), if any."""
    case: Any = None
    """An ``engine.evaluate.suites.Case`` when the prompt comes from a behaviour suite."""
    id: str = ""


@dataclass(frozen=True)
class Scored:
    """One completion's reward: the weighted total and where it came from."""

    value: float
    """The weighted total (what an RL algorithm maximises)."""
    parts: dict[str, float]
    """Per-term / per-check breakdown, plain floats (for logs and the environment's ``info``)."""


class Reward(Protocol):
    def score(self, completions: list[str], items: list[RewardItem]) -> list[Scored]:
        """One ``Scored`` per completion; ``completions[i]`` answers ``items[i]``."""
        ...


class PerItem:
    """Base of the kinds that score each completion on its own (all shipped ones).

    Subclasses implement ``one``; batching stays possible for a kind that needs it (a
    model-based judge) by overriding ``score`` instead.
    """

    name = "reward"

    def score(self, completions: list[str], items: list[RewardItem]) -> list[Scored]:
        if len(completions) != len(items):
            raise ValueError(f"{len(completions)} completions for {len(items)} items: pass one item per completion")
        return [self.one(c, item) for c, item in zip(completions, items, strict=True)]

    def one(self, completion: str, item: RewardItem) -> Scored:
        raise NotImplementedError

    def reference_of(self, item: RewardItem) -> str:
        """The item's reference answer, or a clear error when the prompts carry none."""
        if item.reference is None:
            raise UserError(
                f"reward {self.name}: item '{item.id}' has no reference answer to compare with; "
                "use prompts from a data split (question/answer rows), or a reward that needs none (checks, suite)"
            )
        return item.reference


def items_from_examples(examples: Iterable, *, prefix: str = "") -> list[RewardItem]:
    """``engine.data.Example``s -> items: the prompt turns, the assistant turn as reference.

    Ids are the examples' positions (``prefix`` + index, e.g. ``test/3``): a prepared split
    is deterministic for a seed, so an id names the same prompt in the log and the data.
    """
    return [
        RewardItem(messages=list(ex.prompt_messages), reference=ex.reference, id=f"{prefix}{i}") for i, ex in enumerate(examples)
    ]


def items_from_suite(suite) -> list[RewardItem]:
    """A behaviour suite's cases -> items with ``case`` set (``suite``: a ``Suite`` or its name/path)."""
    from engine.evaluate import suites as suites_mod

    if isinstance(suite, str):
        suite = suites_mod.load(suite)
    return [RewardItem(messages=suite.prompt_messages(case), case=case, id=f"{suite.name}/{case.id}") for case in suite.cases]
