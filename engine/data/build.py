"""Prepare local data files into a cache entry: rows in batches across worker processes.

Why this shape: reading, shaping, rendering and tokenizing a row depend on that row alone,
so they run in ``data.num_proc`` worker processes over batches of ``BATCH`` rows, at most
two batches per worker in flight (peak memory is bounded by batches, not by the data
set). Workers return Arrow record batches that are appended to one temporary Arrow file.
What needs every row (duplicates within a file, the seeded split, duplicates across splits,
rows with no answer left) is decided afterwards from the stored digests and counts, in the
same order and with the same reasons as the in-memory path (``engine.data.rules``).
The Arrow file is the entry's data as written (memory-mapped when read); each split is its
row numbers in seeded order (``<split>.npy``), so no row is written twice.

Workers are forked (they inherit the tokenizer; nothing is pickled but rows and results).
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import chain, islice
from pathlib import Path

import numpy as np
import pyarrow as pa

from engine.data.rules import (
    DUPLICATE,
    DUPLICATE_ACROSS,
    NO_ANSWER,
    SPLITS,
    across_detail,
    dedupe_key,
    json_text,
    messages_json,
    no_answer_detail,
    ratios,
    row_data,
    shape_row,
    split_order,
    split_sizes,
)
from engine.data.shapes import SHAPES, Pair, RowError
from engine.data.sources import Line, block_rows, iter_line_blocks, iter_rows, jsonl_file, no_rows, parse_line
from engine.data.spec import DataSpec
from engine.data.tokens import encode_many

BATCH = 512
"""Rows per worker task: large enough to amortise a task, small enough to bound memory."""
INFLIGHT = 2
"""Tasks per worker queued or running at once (the reader waits beyond that)."""
ROWS_FILE = "rows.arrow"
_INTS = pa.list_(pa.int32())
SCHEMA = pa.schema(
    [
        ("src", pa.int8()),
        ("row", pa.int64()),
        ("key", pa.binary(16)),
        ("order", pa.binary(32)),
        ("messages", pa.string()),
        ("pair", pa.string()),
        ("input_ids", _INTS),
        ("labels", _INTS),
        ("r_messages", pa.string()),
        ("r_input_ids", _INTS),
        ("r_labels", _INTS),
        ("n_tokens", pa.int32()),
        ("r_n_tokens", pa.int32()),
        ("n_labels", pa.int32()),
        ("r_n_labels", pa.int32()),
        ("cut", pa.int8()),
    ]
)


@dataclass(frozen=True)
class Source:
    index: int
    split: str
    path: str
    key: str
    """The config key that names this file (in errors)."""


def sources(spec: DataSpec) -> list[Source]:
    """The files a spec reads: train's ``path``, then the separate validation and test files."""
    out = [Source(0, "train", spec.path, "data.path")]
    for i, name in enumerate(("validation", "test"), start=1):
        path = getattr(spec, f"{name}_path")
        if path:
            out.append(Source(i, name, path, f"data.{name}_path"))
    return out


@dataclass
class Built:
    """What a build leaves besides the split files: counts for the metrics, rejects in order."""

    counts: dict
    rejects: list[dict]
    """{"src", "row", "reason", "detail", "data"} in the in-memory path's order."""
    seconds: float
    processes: int
    pairs: bool
    """Preference pairs (the rejected columns are filled)."""


def build(spec: DataSpec, tokenizer, *, seed: int, source: str, out: Path, num_proc: int) -> Built:
    """Read, shape, tokenize, dedupe and split ``spec``'s files into ``out``: rows.arrow, each split's rows in <split>.npy."""
    t0 = time.perf_counter()
    global _JOB
    _JOB = (spec, tokenizer, source, seed)
    rejects: list[dict] = []
    rows_read = 0
    rows_path = out / ROWS_FILE
    used = [1]
    with pa.OSFile(str(rows_path), "wb") as sink, pa.ipc.new_stream(sink, SCHEMA) as writer:
        for src in sources(spec):
            counter = [0]
            before = 0  # rows of the file in the tasks already written (a block's rows are numbered from it)
            seen: set[bytes] = set()
            for task, (batch, failed, n) in _run(_tasks(src, spec.limit, counter), num_proc, used):
                base = before if isinstance(task[1], _Block) else 0  # a block numbers its rows from 0
                if base:
                    batch, failed = _rebased(batch, failed, base)
                writer.write_batch(_first_of_each(task, batch, failed, seen, rejects, base))
                before += n
            read = counter[0] or before
            if not read:
                raise no_rows(src.path, src.key)
            rows_read += read
    _JOB = None

    from datasets import Dataset

    rows = Dataset.from_file(str(rows_path))
    splits, truncated = _split(spec, rows, rejects, seed)
    table = rows.data
    n_labels = _column(table, "n_labels")
    r_labels = _column(table, "r_n_labels")
    n_tokens, r_tokens = _column(table, "n_tokens"), _column(table, "r_n_tokens")
    train = splits["train"]
    pairs = bool(table.column("pair").null_count < len(table))
    counts = {
        "rows_read": rows_read,
        "truncated": truncated,
        "sizes": {k: len(v) for k, v in splits.items()},
        "train_tokens": int(n_tokens[train].sum() + r_tokens[train].sum()),
        "train_label_tokens": int(n_labels[train].sum() + r_labels[train].sum()),
        "train_sequences": len(train) * (2 if pairs else 1),
    }
    for name, indices in splits.items():
        np.save(out / f"{name}.npy", indices)
    del rows, table
    return Built(counts, rejects, round(time.perf_counter() - t0, 2), used[0], pairs)


# ---------------------------------------------------------------- reading, in batches


@dataclass(frozen=True)
class _Rows:
    """Rows the reading process numbered: [(row number, row or unparsed ``Line``), ...]."""

    items: list


@dataclass(frozen=True)
class _Block:
    """Raw lines of a JSONL file (``iter_line_blocks``): the worker finds the rows, numbered from 0 in the block."""

    first: int
    lines: list[bytes]


def _tasks(src: Source, limit: int | None, counter: list[int]) -> Iterator[tuple[int, _Rows | _Block]]:
    """(source index, rows) tasks of ``BATCH`` rows or lines.

    A JSONL file goes as blocks of raw lines (the reader does nothing per row). Other formats, and
    any file under ``data.limit`` (where the rows must be counted as they are read), go as rows;
    rows past ``limit`` are only counted (``counter``).
    """
    if limit is None and jsonl_file(src.path):
        for first, lines in iter_line_blocks(src.path, src.key, BATCH):
            yield src.index, _Block(first, lines)
        return
    batch = []
    for i, row in enumerate(iter_rows(src.path, src.key)):
        counter[0] = i + 1
        if limit is not None and i >= limit:
            continue
        batch.append((i, row))
        if len(batch) == BATCH:
            yield src.index, _Rows(batch)
            batch = []
    if batch:
        yield src.index, _Rows(batch)


def _items(part: _Rows | _Block) -> list[tuple[int, object]]:
    """A task's (row number, row or ``Line``) pairs; a block's rows numbered from 0."""
    return part.items if isinstance(part, _Rows) else list(enumerate(block_rows(part.first, part.lines)))


def _rebased(batch: pa.RecordBatch, failed: list, base: int) -> tuple[pa.RecordBatch, list]:
    """A block's results with its row numbers counted from the file's first row."""
    numbers = pa.array(batch.column("row").to_numpy() + base)  # numpy: a pyarrow.compute call costs ~1 ms
    rows = batch.set_column(SCHEMA.get_field_index("row"), "row", numbers)
    return rows, [(i + base, *rest) for i, *rest in failed]


def _run(tasks: Iterator, num_proc: int, used: list[int]) -> Iterator[tuple[tuple, tuple]]:
    """(task, result) in task order; in this process when there is one process or one batch (``used``: how many)."""
    first = list(islice(tasks, 2))
    if num_proc <= 1 or len(first) < 2:
        for task in [*first, *tasks]:
            yield task, _work(task)
        return
    used[0] = max(used[0], num_proc)
    # Forked workers inherit the tokenizer; its own thread pool must not be used across a fork.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with multiprocessing.get_context("fork").Pool(num_proc) as pool:
        pending: deque = deque()
        for task in [*first, *tasks]:
            pending.append((task, pool.apply_async(_work, (task,))))
            if len(pending) >= INFLIGHT * num_proc:
                done, result = pending.popleft()
                yield done, result.get()
        while pending:
            done, result = pending.popleft()
            yield done, result.get()


def _first_of_each(task, batch: pa.RecordBatch, failed: list, seen: set[bytes], rejects: list[dict], base: int) -> pa.RecordBatch:
    """Drop rows repeating an earlier row of the same file; record every reject of the batch in row order.

    ``base``: what the task's own row numbers are counted from (a block's first row; 0 for rows the
    reader numbered). Its rows are read again only if one repeats an earlier row: the reject shows it as read.
    """
    src, part = task
    raw: dict = {}
    keep = []
    found = [(i, reason, detail, data) for i, reason, detail, data in failed]
    for k, (i, key) in enumerate(zip(batch.column("row").to_pylist(), batch.column("key").to_pylist(), strict=True)):
        if key in seen:
            raw = raw or {j + base: row for j, row in _items(part)}
            row = raw[i]
            found.append((i, *DUPLICATE, row_data(parse_line(row) if isinstance(row, Line) else row)))
            continue
        seen.add(key)
        keep.append(k)
    for i, reason, detail, data in sorted(found, key=lambda r: r[0]):
        rejects.append({"src": src, "row": i, "reason": reason, "detail": detail, "data": data})
    return batch if len(keep) == batch.num_rows else batch.take(pa.array(keep, type=pa.int64()))


# ---------------------------------------------------------------- one batch, in a worker

_JOB = None
"""(spec, tokenizer, template source, split seed): set before the workers fork."""


def _work(task) -> tuple[pa.RecordBatch, list, int]:
    """Shape, render and tokenize one batch: the kept rows as Arrow, the rest as (row, reason, detail, data),
    and how many rows the task held."""
    spec, tokenizer, source, seed = _JOB
    src, part = task
    items = _items(part)
    shape = SHAPES.get(spec.kind).builder
    ok, failed = [], []
    for i, item in items:
        row = parse_line(item) if isinstance(item, Line) else item
        try:
            ok.append((i, shape_row(spec, shape, row)))
        except RowError as e:
            failed.append((i, e.reason, e.detail, row_data(row)))
    pairs = [m for _, m in ok if isinstance(m, Pair)]
    convs = [m for _, m in ok if not isinstance(m, Pair)]
    encoded = iter(encode_many(source, convs, tokenizer, spec.max_length, spec.train_on_prompt))
    both = encode_many(
        source, [p.chosen_messages for p in pairs] + [p.rejected_messages for p in pairs], tokenizer, spec.max_length, False, True
    )
    chosen, rejected = iter(both[: len(pairs)]), iter(both[len(pairs) :])
    values = []
    for i, msgs in ok:
        if isinstance(msgs, Pair):
            values.append(_pair_values(src, i, msgs, seed, next(chosen), next(rejected)))
        else:
            values.append(_values(src, i, msgs, seed, next(encoded)))
    columns = zip(*values, strict=True) if values else ([] for _ in SCHEMA)
    arrays = [_array(list(column), field.type) for column, field in zip(columns, SCHEMA, strict=True)]
    return pa.RecordBatch.from_arrays(arrays, schema=SCHEMA), failed, len(items)


def _array(values: list, type_: pa.DataType) -> pa.Array:
    """One Arrow column; token-id lists go through numpy (``pa.array`` converts them int by int: measured
    36-106 us a row against ~5, more than the rendering)."""
    if type_ != _INTS:
        return pa.array(values, type=type_)
    present = [v for v in values if v is not None]
    lengths = np.fromiter((len(v) if v is not None else 0 for v in values), dtype=np.int32, count=len(values))
    offsets = np.zeros(len(values) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.fromiter(chain.from_iterable(present), dtype=np.int32, count=int(offsets[-1]))
    mask = None if len(present) == len(values) else pa.array([v is None for v in values])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat), type=_INTS, mask=mask)


def _values(src: int, i: int, msgs: list[dict], seed: int, encoded: tuple) -> tuple:
    """One conversation's row, in ``SCHEMA``'s column order."""
    ids, labels, cut = encoded
    text, key = messages_json(msgs)
    digest, order = _digests(seed, key)
    return (src, i, digest, order, text, None, ids, labels, None, None, None, len(ids), 0, _labelled(labels), 0, cut)


def _pair_values(src: int, i: int, pair: Pair, seed: int, chosen: tuple, rejected: tuple) -> tuple:
    """One preference pair's row, in ``SCHEMA``'s column order."""
    (ids, labels, cut), (r_ids, r_labels, r_cut) = chosen, rejected
    digest, order = _digests(seed, dedupe_key(pair))
    return (
        *(src, i, digest, order, json_text(pair.chosen_messages), json_text(pair.as_dict()), ids, labels),
        *(json_text(pair.rejected_messages), r_ids, r_labels, len(ids), len(r_ids), _labelled(labels), _labelled(r_labels)),
        int(cut or r_cut),
    )


def _digests(seed: int, key: str) -> tuple[bytes, bytes]:
    """The dedupe digest and the split position of an example's content key."""
    return hashlib.sha256(key.encode()).digest()[:16], bytes.fromhex(split_order(seed, key))


def _labelled(labels: list[int]) -> int:
    return len(labels) - labels.count(-100)


# ---------------------------------------------------------------- the split, from the stored digests


def _split(spec: DataSpec, rows, rejects: list[dict], seed: int) -> tuple[dict[str, np.ndarray], int]:
    """Row indices of each split, in order; duplicates across splits and rows without an answer rejected."""
    table = rows.data
    src = _column(table, "src")
    separate = {s.split for s in sources(spec)[1:]}
    train_rows = np.flatnonzero(src == 0)
    order = table.column("order").to_pylist()
    ordered = np.array(sorted(train_rows.tolist(), key=order.__getitem__), dtype=np.int64)
    del order
    n = len(ordered)
    n_val, n_test = split_sizes(n, ratios(spec, separate))
    splits = {
        "train": ordered[: n - n_test - n_val],
        "validation": ordered[n - n_test - n_val : n - n_test],
        "test": ordered[n - n_test :],
    }
    for s in sources(spec)[1:]:
        splits[s.split] = np.flatnonzero(src == s.index)

    # Every example in one split only: test wins over validation, validation over train.
    keys = table.column("key").to_pylist()
    seen: set[bytes] = set()
    for name in ("test", "validation", "train"):
        kept = []
        for r in splits[name].tolist():
            if keys[r] in seen:
                rejects.append(_dropped(rows, r, DUPLICATE_ACROSS, across_detail(name)))
                continue
            seen.add(keys[r])
            kept.append(r)
        splits[name] = np.array(kept, dtype=np.int64)
    del keys, seen

    # Rows whose answer was cut off entirely by max_length.
    cut = _column(table, "cut")
    single = table.column("pair").is_null().to_numpy(False)
    answered = (_column(table, "n_labels") > 0) & ((_column(table, "r_n_labels") > 0) | single)
    truncated = 0
    for name in SPLITS:
        idx = splits[name]
        truncated += int(cut[idx].sum())
        for r in idx[~answered[idx]].tolist():
            rejects.append(_dropped(rows, r, NO_ANSWER, no_answer_detail(spec.max_length)))
        splits[name] = idx[answered[idx]]
    return splits, truncated


def _dropped(rows, r: int, reason: str, detail: str) -> dict:
    row = rows[r]
    data = json.loads(row["pair"]) if row["pair"] is not None else json.loads(row["messages"])
    return {"src": row["src"], "row": row["row"], "reason": reason, "detail": detail, "data": data}


def _column(table, name: str) -> np.ndarray:
    return table.column(name).to_numpy()
