"""Reading rows: JSONL, JSON, CSV, Parquet files, ``datasets`` folders and hub ids.

A row that cannot be read (a line of invalid JSON, bytes that are not UTF-8, a CSV line
with the wrong number of columns) is not skipped here: it becomes a ``BadRow`` carrying
the reason, so the caller writes it to rejected.jsonl and counts it. Nothing is lost
silently. A file that cannot be read at all, or holds no row, is a ``DataError`` (exit
status 2) that says which (empty, a header without rows, a JSON array in a .jsonl file).

``peek`` reads only the first rows: validation uses it to detect ``kind: auto`` and to
check mapped columns before any weight loads.

Every format treats a long row alike: it is read whole (CSV's field-size limit is lifted),
then truncated at ``data.max_length`` tokens and counted, like any other long example.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

from engine.data.kinds import HUB_PREFIX
from engine.errors import UserError

FILE_TYPES = (".jsonl", ".json", ".csv", ".tsv", ".parquet")
PEEK_ROWS = 50
"""Rows ``peek`` reads: enough to see every column of a file whose first rows vary."""
DISK_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")

# Python's csv module refuses fields over 128 KiB; a JSONL row of any length is read, so a
# CSV row is too (both are then truncated at max_length tokens, counted). The limit is a C long.
csv.field_size_limit(min(sys.maxsize, 2**31 - 1))


class DataError(UserError):
    """A data input the user must fix (unreadable file, no usable row): exit status 2."""

    exit_code = 2


@dataclass
class BadRow:
    """An unreadable row: ``reason`` is the category counted in metrics, ``detail`` the specifics."""

    reason: str
    detail: str
    data: Any = None


def read_rows(path: str, key: str = "data.path") -> list[dict | BadRow]:
    """Every row of ``path`` in file order (``key`` names the config key in errors)."""
    return _read(path, key, limit=None)


def peek(path: str, key: str = "data.path", n: int = PEEK_ROWS) -> tuple[list[str], list[dict]] | None:
    """The columns and the first ``n`` readable rows of ``path``; None for a hub dataset (not fetched here).

    Columns are a CSV's or Parquet file's header, else every key of the rows read, in order
    of first appearance. An empty file raises the same ``DataError`` as ``read_rows``.
    """
    if path.startswith(HUB_PREFIX):
        return None
    p = Path(path).expanduser()
    header = _header(p) if p.suffix.lower() in (".csv", ".tsv", ".parquet") else None
    rows = [r for r in _read(path, key, limit=n) if isinstance(r, dict)]
    columns = list(header or dict.fromkeys(k for r in rows for k in r))
    return columns, rows


def iter_rows(path: str, key: str = "data.path") -> Iterator[dict | BadRow | Line]:
    """The rows of ``path`` in file order, one at a time: memory bounded by a row, not the file.

    JSONL lines come unparsed (``Line``; ``parse_line`` in a preparation worker), so the
    reading process only splits lines. The same errors as ``read_rows``, raised when met.
    """
    p = Path(path).expanduser()
    suffix = p.suffix.lower()
    if path.startswith(HUB_PREFIX) or p.is_dir() or suffix not in (".jsonl", ".csv", ".tsv", ".parquet"):
        yield from _read(path, key, limit=None)  # whole: a hub or save_to_disk set is memory-mapped already
        return
    n = 0
    with _reading(p, suffix, key):
        if suffix == ".jsonl":
            rows = _jsonl_lines(p, key)
        elif suffix == ".parquet":
            rows = _parquet_rows(p)
        else:
            rows = _csv_rows(p, delimiter="\t" if suffix == ".tsv" else ",")
        for row in rows:
            n += 1
            yield row
    if not n:
        raise DataError(_empty(p, key))


@contextlib.contextmanager
def _reading(p: Path, suffix: str, key: str):
    """A file that cannot be read, or a corrupt Parquet file, as a ``DataError`` naming the key and file
    (one place for the whole-file and the row-at-a-time readers)."""
    try:
        yield
    except OSError as e:
        raise DataError(f"{key}: cannot read {p}: {e}") from None
    except DataError:
        raise
    except Exception as e:  # pyarrow raises its own types for a corrupt file
        if suffix == ".parquet":
            raise DataError(f"{key}: {p} is not a readable Parquet file: {e}") from None
        raise


def _parquet_rows(p: Path, batch: int = 1024) -> Iterator[dict]:
    import pyarrow.parquet as pq

    for b in pq.ParquetFile(p).iter_batches(batch_size=batch):
        yield from b.to_pylist()


def _read(path: str, key: str, limit: int | None) -> list[dict | BadRow]:
    if path.startswith(HUB_PREFIX):
        return _hub(path[len(HUB_PREFIX) :], key)
    p = Path(path).expanduser()
    if p.is_dir():
        if any((p / marker).exists() for marker in DISK_MARKERS):
            return _from_disk(p, key, limit)
        raise DataError(
            f"{key}: {p} is a folder but not a `datasets` save_to_disk folder; point it at a data file, "
            "or use data=documents for a folder of .txt/.md/.pdf"
        )
    suffix = p.suffix.lower()
    if suffix not in FILE_TYPES:
        raise DataError(f"{key}: unsupported file type '{suffix}' ({p}); use one of {', '.join(FILE_TYPES)}")
    with _reading(p, suffix, key):
        rows = _read_file(p, suffix, key, limit)
    if not rows:
        raise DataError(_empty(p, key))
    return rows


def _read_file(p: Path, suffix: str, key: str, limit: int | None) -> list:
    if suffix == ".jsonl":
        return _jsonl(p, key, limit)
    if suffix == ".json":
        return _json(p, key)[:limit]
    if suffix in (".csv", ".tsv"):
        return _csv(p, delimiter="\t" if suffix == ".tsv" else ",", limit=limit)
    import pyarrow.parquet as pq

    if limit is None:
        return pq.read_table(p).to_pylist()
    batch = next(pq.ParquetFile(p).iter_batches(batch_size=limit), None)
    return batch.to_pylist() if batch is not None else []


def _header(p: Path) -> list[str] | None:
    """A CSV's or Parquet file's column names (None when there is none to read)."""
    try:
        if p.suffix.lower() == ".parquet":
            import pyarrow.parquet as pq

            return list(pq.ParquetFile(p).schema_arrow.names)
        with open(p, newline="", encoding="utf-8-sig", errors="replace") as f:
            return next(csv.reader(f, delimiter="\t" if p.suffix.lower() == ".tsv" else ","), None)
    except Exception:  # an unreadable file is reported by the read that follows, with its reason
        return None


def _empty(p: Path, key: str) -> str:
    """Why a file gave no row at all: empty, a header alone, an empty list."""
    what = "is empty"
    header = _header(p) if p.suffix.lower() in (".csv", ".tsv", ".parquet") else None
    if header:
        what = f"has a header ({', '.join(header)}) but no rows"
    elif p.suffix.lower() == ".json" and p.stat().st_size:
        what = "holds no rows (an empty list or object)"
    elif p.is_file() and p.stat().st_size:
        what = "holds only blank lines"
    return f"{key}: {p} {what}; point {key} at a file with at least one row"


def _decode(raw: bytes, where: str) -> str | BadRow:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return BadRow("undecodable", f"{where}: not UTF-8 ({e.reason} at byte {e.start})", raw.decode("utf-8", "replace"))


@dataclass(frozen=True)
class Line:
    """A JSONL line not parsed yet (``parse_line``): a preparation worker parses it, not the reader."""

    raw: bytes
    number: int
    """1-based line number in the file (what a bad row's detail names)."""


def parse_line(line: Line) -> dict | BadRow:
    """One JSONL line as a row, or the ``BadRow`` saying why it is not one."""
    text = _decode(line.raw, f"line {line.number}")
    if isinstance(text, BadRow):
        return text
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        return BadRow("invalid JSON", f"line {line.number}: {e.msg} (column {e.colno})", text.rstrip("\n"))


def _blank(raw: bytes) -> bool:
    """A line with nothing but whitespace (Unicode whitespace too) is not a row."""
    if not raw.strip():
        return True
    if raw.isascii():
        return False
    try:
        return not raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        return False  # an undecodable line is a row: rejected as undecodable


def _jsonl_lines(path: Path, key: str) -> Iterator[Line]:
    _not_one_array(path, key)
    with open(path, "rb") as f:
        for i, raw in enumerate(f, start=1):
            line = jsonl_row(raw, i)
            if line is not None:
                yield line


def jsonl_row(raw: bytes, number: int) -> Line | None:
    """Line ``number`` of a JSONL file as a row to parse; None for a blank line (not a row). Line 1 loses its BOM."""
    raw = raw.removeprefix(b"\xef\xbb\xbf") if number == 1 else raw
    return None if _blank(raw) else Line(raw, number)


def jsonl_file(path: str) -> bool:
    """A local .jsonl file: what ``iter_line_blocks`` reads."""
    p = Path(path).expanduser()
    return not path.startswith(HUB_PREFIX) and p.suffix.lower() == ".jsonl" and not p.is_dir()


def iter_line_blocks(path: str, key: str, size: int) -> Iterator[tuple[int, list[bytes]]]:
    """A JSONL file cut into blocks of ``size`` raw lines: (1-based number of the block's first line, lines).

    Why: the reading process of a preparation only cuts the file; its workers find the rows
    (``block_rows``), so reading a million rows costs the reader a list per block, not an object
    per row. The same errors as ``iter_rows`` for an unreadable file or one JSON array; a file
    without a row is for the caller to report (``no_rows``) once the workers have counted them.
    """
    p = Path(path).expanduser()
    with _reading(p, ".jsonl", key):
        _not_one_array(p, key)
        with open(p, "rb") as f:
            first = 1
            while lines := list(islice(f, size)):
                yield first, lines
                first += len(lines)


def block_rows(first: int, lines: list[bytes]) -> list[Line]:
    """The rows of a block from ``iter_line_blocks``: its lines that are not blank, numbered as in the file."""
    return [line for j, raw in enumerate(lines) if (line := jsonl_row(raw, first + j)) is not None]


def no_rows(path: str, key: str) -> DataError:
    """The error for a file that gave no row at all (what ``iter_rows`` raises itself)."""
    return DataError(_empty(Path(path).expanduser(), key))


def _jsonl(path: Path, key: str, limit: int | None = None) -> list[dict | BadRow]:
    return [parse_line(line) for line in islice(_jsonl_lines(path, key), limit)]


def _not_one_array(path: Path, key: str) -> None:
    """A .jsonl file that is one JSON array (a .json file by another name) is refused with the fix.

    Only a file starting with ``[`` is parsed whole; a real JSONL file is read line by line.
    """
    with open(path, "rb") as f:
        start = f.read(4096).removeprefix(b"\xef\xbb\xbf").lstrip()
    if not start.startswith(b"["):
        return
    try:
        whole = json.loads(path.read_bytes().decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return  # several lines that are arrays, or broken JSON: rejected line by line
    if isinstance(whole, list):
        raise DataError(
            f"{key}: {path} holds one JSON array, not one JSON object per line; "
            f"rename it to {path.with_suffix('.json').name} (or write one object per line)"
        )


def _json(path: Path, key: str) -> list:
    text = _decode(path.read_bytes().removeprefix(b"\xef\xbb\xbf"), str(path))
    if isinstance(text, BadRow):
        raise DataError(f"{key}: {text.detail}")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(
            f"{key}: {path} is not valid JSON: {e.msg} at line {e.lineno}; for one object per line use .jsonl"
        ) from None
    if isinstance(data, dict):  # {"data": [...]} / {"train": [...]} wrappers, or a single row
        lists = [v for v in data.values() if isinstance(v, list) and v and all(isinstance(r, dict) for r in v)]
        if len(lists) == 1 and len(data) <= 2:
            return lists[0]
        return [data]
    if not isinstance(data, list):
        raise DataError(f"{key}: {path} holds a JSON {type(data).__name__}; expected a list of objects")
    return data


def _csv(path: Path, delimiter: str, limit: int | None = None) -> list[dict | BadRow]:
    return list(islice(_csv_rows(path, delimiter), limit))


def _csv_rows(path: Path, delimiter: str) -> Iterator[dict | BadRow]:
    # surrogateescape keeps undecodable bytes visible as lone surrogates: such a row is
    # rejected as undecodable instead of the whole file failing.
    with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        header = reader.fieldnames or []
        while True:
            line = reader.line_num + 1
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as e:
                yield BadRow("unparsable CSV", f"line {line}: {e}")
                continue
            extra, missing = row.pop(None, None), [k for k, v in row.items() if v is None]
            if extra is not None or missing:
                got = len(header) + len(extra or []) - len(missing)
                yield BadRow("wrong column count", f"line {line}: {got} columns, header has {len(header)}", _clean(row))
                continue
            if any(_has_surrogates(v) for v in row.values()):
                yield BadRow("undecodable", f"line {line}: not UTF-8", _clean(row))
                continue
            yield row


def _has_surrogates(s: str) -> bool:
    return any("\udc80" <= ch <= "\udcff" for ch in s)


def _clean(row: dict) -> dict:
    """A row made JSON-safe for rejected.jsonl (undecodable bytes shown as U+FFFD)."""
    return {
        str(k): v.encode("utf-8", "surrogateescape").decode("utf-8", "replace") if isinstance(v, str) else v
        for k, v in row.items()
    }


def _from_disk(path: Path, key: str, limit: int | None = None) -> list[dict]:
    from datasets import DatasetDict, load_from_disk

    ds = load_from_disk(str(path))
    if isinstance(ds, DatasetDict):
        if "train" not in ds:
            raise DataError(f"{key}: {path} holds splits {list(ds)}; none is 'train'")
        ds = ds["train"]
    return ds.select(range(min(limit, len(ds)))).to_list() if limit is not None else ds.to_list()


def _hub(name: str, key: str) -> list[dict]:
    """``hf:owner/name`` or ``hf:owner/name:split`` (default split: train)."""
    repo, _, split = name.partition(":")
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        raise DataError(
            f"{key}: hub dataset '{repo}' needs the network, but this run is offline (HF_HUB_OFFLINE=1). "
            f"On a machine online: datasets.load_dataset('{repo}').save_to_disk('DIR'), then data.path=DIR"
        )
    from datasets import load_dataset

    try:
        return load_dataset(repo, split=split or "train").to_list()
    except Exception as e:  # connection errors, unknown repo, unknown split: all user-fixable
        raise DataError(f"{key}: cannot load hub dataset '{repo}' (split {split or 'train'}): {type(e).__name__}: {e}") from None
