"""The ``data`` group and the ``prepare_data`` stage's work: file -> clean, split, tokenized.

Pipeline (top-down): read rows -> shape each row into messages (``kind``) -> clean and
dedupe (bad rows go to rejected.jsonl with the reason) -> seeded split -> render with the
template and tokenize, labelling only assistant tokens unless ``train_on_prompt``.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from engine.data.shapes import SHAPES, RowError
from engine.data.sources import BadRow, read_rows
from engine.data.spec import DataSpec
from engine.data.templates import render, render_with_spans, template_source
from engine.errors import UserError

__all__ = ["SHAPES", "DataSpec", "DataBundle", "Example", "prepare"]

IGNORE = -100


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    messages: list[dict]

    @property
    def prompt_messages(self) -> list[dict]:
        return self.messages[:-1]

    @property
    def reference(self) -> str:
        return self.messages[-1]["content"]


@dataclass
class DataBundle:
    splits: dict[str, list[Example]]
    template: str
    metrics: dict = field(default_factory=dict)

    def prompt_text(self, ex: Example, tokenizer) -> str:
        """The example's prompt rendered up to the assistant's turn (for generation)."""
        return render(self.template, ex.prompt_messages, add_generation_prompt=True, tokenizer=tokenizer)


def prepare(spec: DataSpec, tokenizer, *, seed: int, run_dir: Path | None = None) -> DataBundle:
    rows = read_rows(Path(spec.path).expanduser())
    if spec.limit:
        rows = rows[: spec.limit]
    shape = SHAPES.get(spec.kind).builder
    conversations, rejected, seen = [], [], set()
    for i, row in enumerate(rows):
        try:
            if isinstance(row, BadRow):
                raise RowError(str(row))
            if not isinstance(row, dict):
                raise RowError(f"row is {type(row).__name__}, expected an object")
            msgs = shape(spec, row)
            key = json.dumps(msgs, sort_keys=True)
            if key in seen:
                raise RowError("duplicate example")
            seen.add(key)
            conversations.append(msgs)
        except RowError as e:
            rejected.append({"row": i, "reason": str(e), "data": row})
    reasons = Counter(r["reason"].split("'")[0].strip() for r in rejected)
    if run_dir is not None and rejected:
        with open(run_dir / "rejected.jsonl", "w") as f:
            for r in rejected:
                f.write(json.dumps(r, default=str) + "\n")
    if not conversations:
        first = "; ".join(f"row {r['row']}: {r['reason']}" for r in rejected[:3])
        raise UserError(f"data.path: {spec.path} has no usable row ({len(rows)} read). First problems: {first}")

    source = template_source(spec.template, tokenizer)
    split_seed = spec.seed if spec.seed is not None else seed
    splits = split(conversations, spec.split.model_dump(), split_seed)
    truncated = 0
    out: dict[str, list[Example]] = {}
    for name, convs in splits.items():
        out[name] = []
        for msgs in convs:
            ex, cut = tokenize(source, msgs, tokenizer, spec.max_length, spec.train_on_prompt)
            truncated += cut
            if any(label != IGNORE for label in ex.labels):
                out[name].append(ex)
    metrics = {
        "rows_read": len(rows),
        "rows_used": len(conversations),
        "rows_rejected": len(rejected),
        "rejected_by_reason": dict(reasons),
        "truncated": truncated,
        **{f"{k}_examples": len(v) for k, v in out.items()},
        "train_tokens": sum(len(e.input_ids) for e in out.get("train", [])),
    }
    return DataBundle(out, source, metrics)


def split(items: list, ratios: dict[str, float], seed: int) -> dict[str, list]:
    """Seeded split by content hash: the same on every machine, exact proportions."""

    def key(item) -> str:
        return hashlib.sha256(f"{seed}:{json.dumps(item, sort_keys=True)}".encode()).hexdigest()

    ordered = sorted(items, key=key)
    n = len(ordered)
    n_test = round(n * ratios["test"])
    n_val = round(n * ratios["validation"])
    return {
        "train": ordered[: n - n_test - n_val],
        "validation": ordered[n - n_test - n_val : n - n_test],
        "test": ordered[n - n_test :],
    }


def tokenize(source: str, messages: list[dict], tokenizer, max_length: int, train_on_prompt: bool):
    """Render + tokenize one conversation; label tokens inside assistant spans only."""
    text, spans = render_with_spans(source, messages, tokenizer)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    if train_on_prompt:
        labels = list(ids)
    else:
        labels = [
            tid if any(s <= start < e for s, e in spans) else IGNORE
            for tid, (start, _end) in zip(ids, offsets, strict=True)
        ]
    cut = len(ids) > max_length
    return Example(ids[:max_length], labels[:max_length], messages), int(cut)
