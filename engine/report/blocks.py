"""The report's one intermediate form: a list of blocks, written as Markdown and as HTML."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Block:
    kind: str
    """h2 | p | table | img | sample"""
    text: str = ""
    header: list[str] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)
    png: bytes = b""
    name: str = ""
    """File name of an img block under plots/."""
    sample: dict = field(default_factory=dict)
    """A side-by-side generation: question, reference, base, finetuned (and their ROUGE-L)."""
