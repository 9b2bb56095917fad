"""A tokenized example and the prepared data set: plain dataclasses every consumer (batching, evaluation) reads."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from engine.data.templates import render

IGNORE = -100
"""Label of a token that is not trained on (the loss skips it)."""


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    messages: list[dict]
    rejected: Example | None = None
    """Kind preference: the same prompt with the rejected answer (``messages`` is the chosen
    conversation, so generation-based evaluation reads a preference example like any other)."""

    @property
    def prompt_messages(self) -> list[dict]:
        return self.messages[:-1]

    @property
    def reference(self) -> str:
        return self.messages[-1]["content"]


@dataclass
class DataBundle:
    splits: dict[str, Sequence[Example]]
    """Each split's examples: a list, or a ``StoredSplit`` read from the memory-mapped cache."""
    template: str
    metrics: dict = field(default_factory=dict)
    batching: dict = field(default_factory=dict)
    """Keyword arguments for ``collate.Batches`` (packing, group_by_length, max_length)."""
    documents: list = field(default_factory=list)
    """For kind documents: the scored ``Document`` records (what was used, what skipped)."""

    def prompt_text(self, ex: Example, tokenizer) -> str:
        """The example's prompt rendered up to the assistant's turn (for generation)."""
        return render(self.template, ex.prompt_messages, add_generation_prompt=True, tokenizer=tokenizer)
