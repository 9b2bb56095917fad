"""The row shapes the data group knows and their columns: plain tables, importable from anywhere in data/."""

from __future__ import annotations

# Per shape: the logical fields a row provides and the column each is read from by default.
# These are the only defaults: presets leave ``fields`` empty, so switching ``data.kind``
# brings that kind's columns, and ``data.fields.<logical>=<column>`` renames only what it names.
FIELDS: dict[str, dict[str, str]] = {
    "instruction": {"instruction": "instruction", "input": "input", "output": "output", "system": "system"},
    "qa": {"prompt": "question", "response": "answer", "system": "system"},
    "chat": {"messages": "messages"},
    "sharegpt": {"conversations": "conversations"},
    "text": {"text": "text"},
    "preference": {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected", "system": "system"},
    "documents": {},
}
REQUIRED: dict[str, tuple[str, ...]] = {
    "instruction": ("instruction", "output"),
    "qa": ("prompt", "response"),
    "chat": ("messages",),
    "sharegpt": ("conversations",),
    "text": ("text",),
    "preference": ("chosen", "rejected"),
}
"""The logical fields every row of a shape must have (the others are optional).

A preference row's prompt is optional because chat-pair rows (HH-RLHF, UltraFeedback) carry it
inside ``chosen`` and ``rejected`` as their shared leading turns."""
AUTO = "auto"
"""``kind: auto``: the shape is read from the file's columns at validation (``engine.data.detect``)."""
FIELDS[AUTO] = {name: name for kind in REQUIRED for name in FIELDS[kind]}

HUB_PREFIX = "hf:"
MISSING = "???"
STREAM_TYPES = (".jsonl", ".csv", ".tsv", ".parquet")
"""File types ``data.streaming`` reads row by row (besides a datasets save_to_disk folder)."""
