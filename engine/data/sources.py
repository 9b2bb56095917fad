"""Reading rows from files: JSON, JSONL, CSV, Parquet."""

from __future__ import annotations

import json
from pathlib import Path

from engine.errors import UserError


def read_rows(path: Path) -> list:
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            return _jsonl(path)
        if suffix == ".json":
            data = json.loads(path.read_text())
            return data if isinstance(data, list) else data.get("data", [data])
        if suffix in (".csv", ".parquet"):
            import pandas as pd

            df = pd.read_csv(path, dtype=str, keep_default_na=False) if suffix == ".csv" else pd.read_parquet(path)
            return df.to_dict(orient="records")
    except (OSError, ValueError) as e:
        raise UserError(f"data.path: cannot read {path}: {e}") from None
    raise UserError(f"data.path: unsupported file type '{suffix}' ({path}); use .jsonl, .json, .csv or .parquet")


def _jsonl(path: Path) -> list:
    rows = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                rows.append(BadRow(f"line {i + 1}: invalid JSON ({e.msg})"))
    return rows


class BadRow(str):
    """Placeholder for an undecodable line: the shape step rejects it with this reason."""
