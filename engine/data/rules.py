"""The data rules both preparation paths follow: row shaping, deduplication, the seeded split, rejects, metrics.

Why one module: the in-memory path (``engine.data.prepare`` with ``data.cache: false``, a
documents folder, a hub set) and the cached, multi-process path (``engine.data.build``)
must give the same examples, the same rejected rows in the same order and the same
metrics; they share these functions rather than each having its own copy.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from engine.data.shapes import SHAPES, Pair, RowError
from engine.data.sources import BadRow, DataError
from engine.data.spec import DataSpec
from engine.files import shown_path

SPLITS = ("train", "validation", "test")


@dataclass
class Rejects:
    """Rows not used, with reasons; written to rejected.jsonl, counted in metrics."""

    rows: list[dict] = field(default_factory=list)

    def add(self, source: str, row: int, reason: str, detail: str, data) -> None:
        self.rows.append({"file": source, "row": row, "reason": reason, "detail": detail, "data": data})

    def counts(self) -> dict[str, int]:
        return dict(Counter(r["reason"] for r in self.rows))


def shape_row(spec: DataSpec, shape, row) -> list[dict] | Pair:
    """A read row as messages (or a preference ``Pair``); raises ``RowError`` with the reason."""
    if isinstance(row, BadRow):
        raise RowError(row.reason, row.detail)
    if not isinstance(row, dict):
        raise RowError("wrong type", f"row is {type(row).__name__}, expected an object")
    return shape(spec, row)


def row_data(row):
    """What rejected.jsonl shows of a row that could not be shaped."""
    return row.data if isinstance(row, BadRow) else row


def example_data(msgs: list[dict] | Pair):
    """What rejected.jsonl shows of a shaped example (dropped later: duplicate across splits, no answer)."""
    return msgs.as_dict() if isinstance(msgs, Pair) else msgs


DUPLICATE = ("duplicate", "same example as an earlier row (after whitespace normalisation)")


_KEY_JSON = json.JSONEncoder(sort_keys=True, ensure_ascii=False)
"""``json.dumps(..., sort_keys=True, ensure_ascii=False)``, the encoder built once (a million rows call it)."""


def dedupe_key(msgs: list[dict] | Pair) -> str:
    """Two rows are the same example when their shaped, normalised content is."""
    return _KEY_JSON.encode(example_data(msgs))


_JSON = json.JSONEncoder(ensure_ascii=False)
_ROLE_CONTENT = ("role", "content")


def json_text(value) -> str:
    """``json.dumps(value, ensure_ascii=False)`` without building an encoder per call (a million rows call it)."""
    return _JSON.encode(value)


def messages_json(msgs: list[dict]) -> tuple[str, str]:
    """(``json.dumps(msgs, ensure_ascii=False)``, ``dedupe_key(msgs)``) of a conversation.

    Why both at once: a million-row preparation stores the one and hashes the other for every row.
    Messages of exactly a role and a text (what every shape builds) escape each text once and
    write both strings around it, in the two key orders; anything else goes through the encoders.
    """
    if all(isinstance(m, dict) and tuple(m) == _ROLE_CONTENT and isinstance(m["content"], str) for m in msgs):
        parts = [(_string(m["role"]), _string(m["content"])) for m in msgs]
        plain = ", ".join(f'{{"role": {r}, "content": {c}}}' for r, c in parts)
        keyed = ", ".join(f'{{"content": {c}, "role": {r}}}' for r, c in parts)
        return f"[{plain}]", f"[{keyed}]"
    return json_text(msgs), dedupe_key(msgs)


def _string(value) -> str:
    """A JSON string as ``json.dumps(..., ensure_ascii=False)`` writes it (a role that is not text: its JSON)."""
    return json.encoder.encode_basestring(value) if isinstance(value, str) else json_text(value)


def split_order(seed: int, key: str) -> str:
    """Where an example sorts in the seeded split: the same on every machine."""
    return hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()


def split_sizes(n: int, ratios: dict[str, float]) -> tuple[int, int]:
    """(validation, test) counts of ``n`` examples; train takes the rest (exact proportions)."""
    return round(n * ratios["validation"]), round(n * ratios["test"])


def split(items: list, ratios: dict[str, float], seed: int) -> dict[str, list]:
    """Seeded split by content hash: the same on every machine, exact proportions."""

    def key(item) -> str:
        msgs = item[2] if isinstance(item, tuple) else item
        return split_order(seed, dedupe_key(msgs))

    ordered = sorted(items, key=key)
    n = len(ordered)
    n_val, n_test = split_sizes(n, ratios)
    return {
        "train": ordered[: n - n_test - n_val],
        "validation": ordered[n - n_test - n_val : n - n_test],
        "test": ordered[n - n_test :],
    }


def ratios(spec: DataSpec, separate: set[str]) -> dict[str, float]:
    """Split ratios for ``path``: a split given as its own file takes no share of it."""
    r = spec.split.model_dump()
    for name in ("validation", "test"):
        if name in separate:
            r[name] = 0.0
    total = sum(r.values()) or 1.0
    return {k: v / total for k, v in r.items()}


DUPLICATE_ACROSS = "duplicate across splits"
NO_ANSWER = "no answer within max_length"


def no_answer_detail(max_length: int) -> str:
    return f"prompt fills all {max_length} tokens"


def across_detail(name: str) -> str:
    return f"also in a held-out split; dropped from {name}"


def no_usable(path: str, n: int, rejects: Rejects) -> DataError:
    if not n:  # a documents folder whose documents were all skipped (sources refuse a file with no rows)
        return DataError(f"data.path: {path} gave no usable text; documents.json in the run dir says why for each file")
    if not rejects.rows:  # every row went to a held-out split
        return DataError(
            f"data.path: {path} has {n} usable rows and data.split puts none in train; give train a larger share or add rows"
        )
    first = "\n".join(f"  - {r['file']} row {r['row']}: {r['detail']}" for r in rejects.rows[:5])
    counts = ", ".join(f"{k}: {v}" for k, v in rejects.counts().items())
    return DataError(
        f"data.path: {path} has no usable training row ({n} read; rejected: {counts}). First problems:\n{first}\n"
        "Check the file's columns against data.kind (or map them with data.fields.<name>=<column>)."
    )


def data_metrics(
    spec: DataSpec,
    *,
    templated: bool,
    rows_read: int,
    rejects: dict[str, int],
    truncated: int,
    sizes: dict[str, int],
    train_tokens: int,
    train_label_tokens: int,
    train_sequences: int,
) -> dict:
    """prepare_data's metrics (metrics.json), the same numbers whichever path prepared the data."""
    return {
        "kind": spec.kind,
        "kind_detected": spec.detected,
        "template": spec.template if templated else None,
        "rows_read": rows_read,
        "rows_used": sum(sizes.values()),
        "rows_rejected": sum(rejects.values()),
        "rejected_by_reason": rejects,
        "truncated": truncated,
        **{f"{k}_examples": sizes[k] for k in SPLITS},
        "train_tokens": train_tokens,
        "train_label_tokens": train_label_tokens,
        "mean_train_length": round(train_tokens / train_sequences, 1),
    }


def batching_of(spec: DataSpec) -> dict:
    """``collate.Batches`` options from the spec (not part of the prepared data: a cache serves any)."""
    return {"packing": spec.packing, "group_by_length": spec.group_by_length, "max_length": spec.max_length}


def write_rejected(rows, run_dir: Path) -> None:
    """rejected.jsonl, each file as shown_path names it: no local path in the run dir."""
    with open(run_dir / "rejected.jsonl", "w") as f:
        f.writelines(rejected_line(r, run_dir) for r in rows)


def rejected_line(r: dict, run_dir: Path) -> str:
    """One reject (file, row, reason, detail, data) as a line of a run dir's report, its file as ``shown_path`` names it."""
    return json.dumps({**r, "file": shown_path(r["file"], run_dir)}, default=str, ensure_ascii=False) + "\n"


def shape_rows(spec: DataSpec, path: str, rows: list, rejects: Rejects) -> list[tuple[str, int, list[dict]]]:
    """(file, row number, messages) for every usable row; duplicates within the file rejected."""
    shape = SHAPES.get(spec.kind).builder
    seen: set[str] = set()
    out = []
    for i, row in enumerate(rows[: spec.limit] if spec.limit else rows):
        try:
            msgs = shape_row(spec, shape, row)
            key = dedupe_key(msgs)
            if key in seen:
                raise RowError(*DUPLICATE)
            seen.add(key)
            out.append((path, i, msgs))
        except RowError as e:
            rejects.add(path, i, e.reason, e.detail, row_data(row))
    return out


def dedupe_across(splits: dict[str, list], rejects: Rejects) -> None:
    """An example in test is removed from validation and train; one in validation from train."""
    seen: set[str] = set()
    for name in ("test", "validation", "train"):
        kept = []
        for path, i, msgs in splits.get(name, []):
            key = dedupe_key(msgs)
            if key in seen:
                rejects.add(path, i, DUPLICATE_ACROSS, across_detail(name), example_data(msgs))
                continue
            seen.add(key)
            kept.append((path, i, msgs))
        splits[name] = kept
