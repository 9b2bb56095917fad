"""``data.streaming: true``: the train file as an endless stream, for data larger than memory.

Rows are read one at a time (``sources.iter_rows``, with each row's position), drawn at
random from a shuffle buffer of ``data.shuffle_buffer`` rows, then shaped, rendered and
tokenized one by one, and (``data.packing``) packed greedily into rows of ``max_length``
tokens. Memory holds the buffer and one micro-batch: it does not grow with the file.

Exact resume: ``state()`` is the stream's whole position (epoch, the next row of the file,
the buffer as row positions, the RNG state, the example carried into the next micro-batch,
rejects so far). The training loop stores it in each checkpoint; ``batches(state=...)``
re-reads only the buffered rows and continues with exactly the micro-batches an
uninterrupted run would have drawn. Every rank reads the same stream and keeps every
``world``-th micro-batch.

What differs from map-style data (docs/data.md): ``data.split`` does not divide a stream;
held-out rows come from ``data.validation_path`` / ``data.test_path``, and stream rows
equal to one of them are skipped. Duplicates within the stream are not removed (that
needs every row's key in memory). Rows that cannot be used are counted by reason, and those of
the first pass written to the run dir's ``rejected_stream.jsonl`` (cut back on resume to what the
checkpoint had written, so each is reported once).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from functools import partial
from pathlib import Path

from engine.data.example import DataBundle, Example
from engine.data.rules import (
    DUPLICATE_ACROSS,
    NO_ANSWER,
    Rejects,
    across_detail,
    batching_of,
    dedupe_across,
    dedupe_key,
    example_data,
    no_answer_detail,
    rejected_line,
    row_data,
    shape_row,
    shape_rows,
    write_rejected,
)
from engine.data.shapes import SHAPES, Pair, RowError
from engine.data.sources import DataError, Line, iter_rows, jsonl_row, parse_line, read_rows
from engine.data.spec import DataSpec
from engine.data.templates import template_source, templated
from engine.data.tokens import tokenize, tokenize_pair
from engine.files import write_text_atomic

STREAM_REJECTED = "rejected_stream.jsonl"
"""The rows of the streamed train file skipped in its first pass, in the order the stream met them
(rejected.jsonl holds the held-out files' rejects, written before training as for map-style data)."""


class TrainStream:
    """The train split of a streamed data set: not a sequence (its length is unknown), a source of micro-batches."""

    def __init__(self, spec: DataSpec, tokenizer, *, source: str, held_out: set[bytes], report: Path | None = None):
        self.spec, self.tokenizer, self.source = spec, tokenizer, source
        self.held_out = held_out
        """Digests of the validation/test examples: a stream row equal to one is skipped."""
        self.path = spec.path
        self.report = report
        """Where the rows skipped in the first pass are written (the main process's run dir), or None."""

    def __getitem__(self, i):
        """``stream[:n]``: the first n examples in file order (what preview_data prints)."""
        if not isinstance(i, slice) or i.start or i.step:
            raise TypeError("a streamed split is read from its start: stream[:n]")
        out = []
        for _, _, row in _positioned(self.path, START):
            if len(out) >= (i.stop or 0):
                break
            ex = self._example(row, {})
            if ex is not None:
                out.append(ex)
        return out

    def batches(
        self,
        *,
        micro_batch_size: int,
        pad_id: int,
        seed: int,
        rank: int = 0,
        world: int = 1,
        packing: bool = False,
        max_length: int | None = None,
        mask_dtype=None,
        segments: bool = False,
        group_by_length: bool = False,
        state: dict | None = None,
    ) -> StreamBatches:
        """Micro-batches forever, from ``state`` (an earlier ``StreamBatches.state()``) on.

        Takes ``collate.Batches``' options; ``group_by_length`` has no meaning for a stream (the
        shuffle buffer decides the order) and is ignored.
        """
        from engine.data import collate as c  # torch: loaded when training starts

        options = {"packing": packing, "mask_dtype": mask_dtype or c.torch.float32, "segments": segments}
        collate = partial(c.collate, pad_id=pad_id, **options)
        out = StreamBatches(self, micro_batch_size=micro_batch_size, collate=collate, packing=packing, rank=rank, world=world)
        out.max_length = max_length or self.spec.max_length
        return out.start(seed, state)

    def _example(self, row, rejected: dict[str, int], skip=None) -> Example | None:
        """Shape, render and tokenize one row; None (counted in ``rejected``, and told to ``skip(reason,
        detail, data)`` when given) when it cannot be used: the same reasons as map-style data."""
        spec = self.spec
        try:
            msgs = shape_row(spec, SHAPES.get(spec.kind).builder, row)
        except RowError as e:
            return _skipped(rejected, skip, e.reason, e.detail, row_data(row))
        if self.held_out and hashlib.sha256(dedupe_key(msgs).encode()).digest()[:16] in self.held_out:
            return _skipped(rejected, skip, DUPLICATE_ACROSS, across_detail("train"), example_data(msgs))
        if isinstance(msgs, Pair):
            ex, _ = tokenize_pair(self.source, msgs, self.tokenizer, spec.max_length)
        else:
            ex, _ = tokenize(self.source, msgs, self.tokenizer, spec.max_length, spec.train_on_prompt)
        if not any(t != -100 for t in ex.labels) or (ex.rejected and not any(t != -100 for t in ex.rejected.labels)):
            return _skipped(rejected, skip, NO_ANSWER, no_answer_detail(spec.max_length), example_data(msgs))
        return ex


def _skipped(rejected: dict[str, int], skip, reason: str, detail: str, data) -> None:
    rejected[reason] = rejected.get(reason, 0) + 1
    if skip is not None:
        skip(reason, detail, data)


class StreamBatches:
    """The iterator the training loop takes micro-batches from; ``state()`` says exactly where it is."""

    def __init__(self, stream: TrainStream, *, micro_batch_size, collate, packing, rank, world):
        self.s = stream
        self.mbs, self.collate, self.packing = micro_batch_size, collate, packing
        self.max_length = stream.spec.max_length
        self.rank, self.world = rank, world
        self.buffer_size = stream.spec.shuffle_buffer

    # -- position

    def start(self, seed: int, state: dict | None) -> StreamBatches:
        self.rng = random.Random(seed)
        self.epoch, self.batch_index, self.carry, self.rejected, self.reported = 0, 0, None, {}, 0
        self.buffer: list[tuple[Pos, object]] = []  # (position, row)
        self.next = START
        if state is not None:
            self.epoch, self.batch_index, self.rejected = state["epoch"], state["batch"], dict(state["rejected"])
            self.reported = state.get("reported", 0)
            version, internal, gauss = state["rng"]
            self.rng.setstate((version, tuple(internal), gauss))
            self.next = _pos(state["next"])
            wanted = [_pos(x) for x in state["buffer"]] + ([_pos(state["carry"])] if state["carry"] else [])
            rows = _fetch(self.s.path, wanted)
            self.buffer = [(at, rows[at[:2]]) for at in map(_pos, state["buffer"])]
            if state["carry"]:
                at = _pos(state["carry"])
                self.carry = (at, self.s._example(rows[at[:2]], {}))
        if self.s.report is not None:
            _keep_lines(self.s.report, self.reported)
        self.reader = _positioned(self.s.path, self.next)
        return self

    def state(self) -> dict:
        """JSON-able: what ``start`` needs to continue exactly here."""
        version, internal, gauss = self.rng.getstate()
        return {
            "epoch": self.epoch,
            "batch": self.batch_index,
            "next": list(self.next),
            "buffer": [list(at) for at, _ in self.buffer],
            "carry": list(self.carry[0]) if self.carry else None,
            "rng": [version, list(internal), gauss],
            "rejected": dict(self.rejected),
            "reported": self.reported,
        }

    # -- drawing

    def _read(self):
        """The next (position, row) of the file, or None at its end."""
        try:
            at, after, row = next(self.reader)
        except StopIteration:
            return None
        self.next = after
        return at, row

    def _draw(self):
        """One row drawn at random from the buffer (refilled from the file); a new epoch at the end."""
        while len(self.buffer) < self.buffer_size:
            got = self._read()
            if got is None:
                break
            self.buffer.append(got)
        if not self.buffer:
            self.epoch += 1
            self.reader = _positioned(self.s.path, START)
            self.next = START
            if not any(True for _ in _positioned(self.s.path, START)):
                raise DataError(f"data.path: {self.s.path} has no rows")
            return self._draw()
        j = self.rng.randrange(len(self.buffer))
        self.buffer[j], self.buffer[-1] = self.buffer[-1], self.buffer[j]
        return self.buffer.pop()

    def _examples(self) -> Iterator[tuple[Pos, Example]]:
        misses = 0
        while True:
            at, row = self._draw()
            first_pass = self.epoch == 0 and self.s.report is not None
            ex = self.s._example(row, self.rejected, partial(self._skip, at) if first_pass else None)
            if ex is None:
                misses += 1
                if misses > 10 * self.buffer_size + 10_000:
                    raise DataError(
                        f"data.path: no usable row in {misses} rows read from the stream (rejected: {self.rejected}); "
                        "check data.kind and data.fields against the file's columns"
                    )
                continue
            misses = 0
            yield at, ex

    def _skip(self, at: Pos, reason: str, detail: str, data) -> None:
        """A row skipped in the first pass, appended to the report (a resumed stream first cuts the
        report back to the rows its checkpoint had reported, then meets the rest again)."""
        entry = {"file": self.s.path, "row": at[0], "reason": reason, "detail": detail, "data": data}
        with open(self.s.report, "a") as f:
            f.write(rejected_line(entry, self.s.report.parent))
        self.reported += 1

    def _micro_batch(self) -> list:
        """The next micro-batch's examples: ``mbs`` examples, or with packing ``mbs`` rows of packed examples."""
        if not self.packing:
            out = []
            while len(out) < self.mbs:
                out.append(next(self._gen)[1])
            return out
        rows, row, used = [], [], 0
        while True:
            if self.carry is not None:
                item, self.carry = self.carry, None
            else:
                item = next(self._gen)
            n = len(item[1].input_ids)
            if row and used + n > self.max_length:
                rows.append(row)
                row, used = [], 0
                if len(rows) == self.mbs:
                    self.carry = item
                    return rows
            row.append(item[1])
            used += n

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        self._gen = getattr(self, "_gen", None) or self._examples()
        while True:
            examples = self._micro_batch()
            mine = self.batch_index % self.world == self.rank
            self.batch_index += 1
            if mine:
                return self.collate(examples)


# ---------------------------------------------------------------- positions in a file


Pos = tuple[int, int, int]
"""Where a row is: (row number, position, line number). The position is a JSONL file's byte offset
(a resumed stream seeks), else the row number; the line number names a JSONL row in reject details."""
START: Pos = (0, 0, 1)


def _pos(saved: list) -> Pos:
    """A position from a checkpoint's state.json (one written before line numbers: line 0, unknown)."""
    return (saved[0], saved[1], saved[2] if len(saved) > 2 else 0)


def _positioned(path: str, start: Pos) -> Iterator[tuple[Pos, Pos, object]]:
    """(position, the next row's position, row) from ``start`` on.

    JSONL: read from the byte offset, rows being the lines that are not blank, as map-style data
    reads them (``sources.jsonl_row``); other files: read up to the row number again, without
    shaping or tokenizing.
    """
    p = Path(path).expanduser()
    if p.suffix.lower() == ".jsonl":
        with open(p, "rb") as f:
            f.seek(start[1])
            i, at, n = start
            for raw in f:
                pos, at = at, at + len(raw)
                line = jsonl_row(raw, n if pos else 1)  # line 1 loses its BOM
                n += 1
                if line is not None:
                    yield (i, pos, line.number), (i + 1, at, n), parse_line(line)
                    i += 1
        return
    for i, r in enumerate(iter_rows(path)):
        if i >= start[0]:
            yield (i, i, 0), (i + 1, i + 1, 0), parse_line(r) if isinstance(r, Line) else r


def _fetch(path: str, wanted: list[Pos]) -> dict[tuple[int, int], object]:
    """The rows at these positions, by (row number, position): JSONL by seeking to each offset; other files by one pass."""
    out = {}
    p = Path(path).expanduser()
    if p.suffix.lower() == ".jsonl":
        with open(p, "rb") as f:
            for i, pos, line in wanted:
                f.seek(pos)
                raw = f.readline()
                out[(i, pos)] = parse_line(Line(raw.removeprefix(b"\xef\xbb\xbf") if pos == 0 else raw, line))
        return out
    need = {at[:2] for at in wanted}
    for at, _, row in _positioned(path, START):
        if at[:2] in need:
            out[at[:2]] = row
            if len(out) == len(need):
                break
    return out


def _keep_lines(path: Path, n: int) -> None:
    """``path`` cut back to its first ``n`` lines (created empty when ``n`` is 0)."""
    kept = []
    if n and path.is_file():
        with open(path) as f:
            kept = [line for _, line in zip(range(n), f, strict=False)]
    write_text_atomic(path, "".join(kept))


def prepare_streaming(spec: DataSpec, tokenizer, *, seed: int, run_dir: Path | None = None):
    """The held-out files prepared in memory (as map-style data); the train file as a ``TrainStream``."""
    source = template_source(spec.template, tokenizer) if templated(spec.kind) else ""
    rejects = Rejects()
    splits: dict[str, list] = {"validation": [], "test": []}
    read = 0
    for name in splits:
        path = getattr(spec, f"{name}_path")
        if path:
            rows = read_rows(path, f"data.{name}_path")
            read += len(rows)
            splits[name] = shape_rows(spec, path, rows, rejects)
    dedupe_across(splits, rejects)
    out: dict[str, list] = {}
    held_out: set[bytes] = set()
    for name, items in splits.items():
        out[name] = []
        for path, i, msgs in items:
            if isinstance(msgs, Pair):
                ex, _ = tokenize_pair(source, msgs, tokenizer, spec.max_length)
            else:
                ex, _ = tokenize(source, msgs, tokenizer, spec.max_length, spec.train_on_prompt)
            held_out.add(hashlib.sha256(dedupe_key(msgs).encode()).digest()[:16])
            if any(t != -100 for t in ex.labels) and (ex.rejected is None or any(t != -100 for t in ex.rejected.labels)):
                out[name].append(ex)
            else:
                rejects.add(path, i, NO_ANSWER, no_answer_detail(spec.max_length), example_data(msgs))
    if run_dir is not None and rejects.rows:
        write_rejected(rejects.rows, run_dir)
    report = run_dir / STREAM_REJECTED if run_dir is not None else None
    out["train"] = TrainStream(spec, tokenizer, source=source, held_out=held_out, report=report)
    metrics = {
        "kind": spec.kind,
        "kind_detected": spec.detected,
        "template": spec.template if source else None,
        "streaming": True,
        "rows_read": read,
        "rows_rejected": len(rejects.rows),
        "rejected_by_reason": rejects.counts(),
        "train_examples": None,
        "validation_examples": len(out["validation"]),
        "test_examples": len(out["test"]),
    }
    return DataBundle(out, source or (tokenizer.chat_template or ""), metrics, batching_of(spec))
