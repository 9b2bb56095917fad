"""Reading rows: JSONL, JSON, CSV, Parquet files, ``datasets`` folders and hub ids.

A row that cannot be read (a line of invalid JSON, bytes that are not UTF-8, a CSV line
with the wrong number of columns) is not skipped here: it becomes a ``BadRow`` carrying
the reason, so the caller writes it to rejected.jsonl and counts it. Nothing is lost
silently. A file that cannot be read at all is a ``DataError`` (exit status 2).
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.data.spec import HUB_PREFIX
from engine.errors import UserError

FILE_TYPES = (".jsonl", ".json", ".csv", ".tsv", ".parquet")


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
    if path.startswith(HUB_PREFIX):
        return _hub(path[len(HUB_PREFIX) :], key)
    p = Path(path).expanduser()
    if p.is_dir():
        if any((p / marker).exists() for marker in ("dataset_info.json", "state.json", "dataset_dict.json")):
            return _from_disk(p, key)
        raise DataError(
            f"{key}: {p} is a folder but not a `datasets` save_to_disk folder; point it at a data file, "
            "or use data=documents for a folder of .txt/.md/.pdf"
        )
    suffix = p.suffix.lower()
    try:
        if suffix == ".jsonl":
            return _jsonl(p)
        if suffix == ".json":
            return _json(p, key)
        if suffix in (".csv", ".tsv"):
            return _csv(p, delimiter="\t" if suffix == ".tsv" else ",")
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(p).to_pylist()
    except OSError as e:
        raise DataError(f"{key}: cannot read {p}: {e}") from None
    except Exception as e:  # pyarrow raises its own types for a corrupt file
        if suffix == ".parquet":
            raise DataError(f"{key}: {p} is not a readable Parquet file: {e}") from None
        raise
    raise DataError(f"{key}: unsupported file type '{suffix}' ({p}); use one of {', '.join(FILE_TYPES)}")


def _decode(raw: bytes, where: str) -> str | BadRow:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return BadRow("undecodable", f"{where}: not UTF-8 ({e.reason} at byte {e.start})", raw.decode("utf-8", "replace"))


def _jsonl(path: Path) -> list[dict | BadRow]:
    rows: list[dict | BadRow] = []
    with open(path, "rb") as f:
        for i, raw in enumerate(f, start=1):
            line = _decode(raw.removeprefix(b"\xef\xbb\xbf") if i == 1 else raw, f"line {i}")
            if isinstance(line, BadRow):
                rows.append(line)
                continue
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                rows.append(BadRow("invalid JSON", f"line {i}: {e.msg} (column {e.colno})", line.rstrip("\n")))
    return rows


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


def _csv(path: Path, delimiter: str) -> list[dict | BadRow]:
    rows: list[dict | BadRow] = []
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
                rows.append(BadRow("unparsable CSV", f"line {line}: {e}"))
                continue
            extra, missing = row.pop(None, None), [k for k, v in row.items() if v is None]
            if extra is not None or missing:
                got = len(header) + len(extra or []) - len(missing)
                rows.append(BadRow("wrong column count", f"line {line}: {got} columns, header has {len(header)}", _clean(row)))
                continue
            if any(_has_surrogates(v) for v in row.values()):
                rows.append(BadRow("undecodable", f"line {line}: not UTF-8", _clean(row)))
                continue
            rows.append(row)
    return rows


def _has_surrogates(s: str) -> bool:
    return any("\udc80" <= ch <= "\udcff" for ch in s)


def _clean(row: dict) -> dict:
    """A row made JSON-safe for rejected.jsonl (undecodable bytes shown as U+FFFD)."""
    return {
        str(k): v.encode("utf-8", "surrogateescape").decode("utf-8", "replace") if isinstance(v, str) else v
        for k, v in row.items()
    }


def _from_disk(path: Path, key: str) -> list[dict]:
    from datasets import DatasetDict, load_from_disk

    ds = load_from_disk(str(path))
    if isinstance(ds, DatasetDict):
        if "train" not in ds:
            raise DataError(f"{key}: {path} holds splits {list(ds)}; none is 'train'")
        ds = ds["train"]
    return ds.to_list()


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
