"""Which row shape a data file has, read from its first rows (``kind: auto``), and whether
the columns a named shape needs are there.

Why at validation: a file whose columns fit no shape, or a mapped column the file does not
have, is a config problem. Found from the first rows (``sources.peek``), it exits with
status 2 and names the columns that do exist, before any weight loads; found at prepare
time it would surface only as every row rejected.

A shape fits when every column it requires (``spec.REQUIRED``, after ``data.fields``
renames) is among the columns read. Conversation columns are told apart by their turns:
``role``/``content`` turns are chat (OpenAI ``messages``), ``from``/``value`` turns are
ShareGPT, whichever of the two names the column has.
"""

from __future__ import annotations

import json
from typing import Any

from engine.data.kinds import FIELDS, REQUIRED

AUTO_ORDER = ("instruction", "qa", "chat", "sharegpt", "preference", "text")
TURNS = {"chat": ("messages", ("role", "content")), "sharegpt": ("conversations", ("from", "value"))}
"""Conversation shape -> (its logical field, the keys of one turn)."""


class Unfit(Exception):
    """The file does not fit the config: ``loc`` is the key under ``data`` to report, ``value`` what it holds."""

    def __init__(self, loc: tuple, value: Any, message: str):
        self.loc, self.value, self.message = loc, value, message
        super().__init__(message)


def detect(path: str, seen: tuple[list[str], list[dict]] | None, fields: dict[str, str]) -> tuple[str, dict[str, str], str]:
    """(kind, field renames, why) for the file's columns; ``Unfit`` when none or several shapes fit."""
    if seen is None:
        raise Unfit(
            ("kind",),
            "auto",
            f"auto reads the columns of a file, but {path} is fetched from the hub only when the data "
            "is prepared; name the kind: data.kind=<one of " + ", ".join(AUTO_ORDER) + ">",
        )
    columns, rows = seen
    fits = _fits(columns, rows, fields)
    if len(fits) == 1:
        return fits[0]
    shown = ", ".join(columns) or "none"
    if not fits:
        raise Unfit(
            ("kind",),
            "auto",
            f"auto cannot tell the kind of {path} from its columns ({shown}). Each kind reads: {_expected(fields)}. "
            f"Name the kind and map your columns, e.g. {_example(columns)}",
        )
    which = "; ".join(f"{kind} ({why})" for kind, _, why in fits)
    raise Unfit(
        ("kind",),
        "auto",
        f"auto found columns {shown} in {path}, which fit more than one kind: {which}; "
        f"name the one you mean: {' or '.join(f'data.kind={kind}' for kind, _, _ in fits)}",
    )


def check_columns(path: str, seen: tuple[list[str], list[dict]] | None, kind: str, fields: dict[str, str]) -> list[Unfit]:
    """One ``Unfit`` (naming ``data.fields.<name>``) per column ``kind`` requires that none of the rows read has.

    Only required columns are checked, and only against the first rows: a column missing
    there is missing from the data set as users write it, not from one stray row.
    """
    if seen is None:
        return []
    columns, rows = seen
    mapped = {fields.get(n, FIELDS[kind][n]) for n in FIELDS[kind]}
    others = [c for c in columns if c not in mapped and (kind not in TURNS or _turn_style(rows, c))]
    missing = [name for name in REQUIRED[kind] if fields.get(name, FIELDS[kind][name]) not in columns]
    fit = _fits(columns, rows, {})
    problems = []
    for i, name in enumerate(missing):
        column = fields.get(name, FIELDS[kind][name])
        hint = f"set data.fields.{name}=<column>" + (f", e.g. data.fields.{name}={others[i]}" if i < len(others) else "")
        if fit and fit[0][0] != kind:
            hint += f"; or, if this is {fit[0][0]} data, data.kind={fit[0][0]} (or data.kind=auto)"
        message = (
            f"kind {kind} reads its {name} from column '{column}', which {path} does not have "
            f"(its columns: {', '.join(columns) or 'none'}); {hint}"
        )
        problems.append(Unfit(("fields", name), column, message))
    return problems


def _fits(columns: list[str], rows: list[dict], fields: dict[str, str]) -> list[tuple[str, dict[str, str], str]]:
    """Every shape the columns fit, as (kind, field renames, why)."""
    fits = []
    for kind in AUTO_ORDER:
        if kind in TURNS or not set(fields) <= set(FIELDS[kind]):
            continue
        needed = [fields.get(name, FIELDS[kind][name]) for name in REQUIRED[kind]]
        if all(c in columns for c in needed):
            own = {k: v for k, v in fields.items() if k in FIELDS[kind]}
            why = ("columns " + ", ".join(f"'{c}'" for c in needed)) if len(needed) > 1 else f"column '{needed[0]}'"
            fits.append((kind, own, why))
    if set(fields) <= {logical for logical, _ in TURNS.values()}:
        fits += _conversation_fits(columns, rows, fields)
    order = {kind: i for i, kind in enumerate(AUTO_ORDER)}
    return sorted(fits, key=lambda fit: order[fit[0]])


def _conversation_fits(columns: list[str], rows: list[dict], fields: dict[str, str]) -> list[tuple[str, dict[str, str], str]]:
    """Chat or ShareGPT for each conversation column present, decided by the keys of its turns."""
    fits, done = [], set()
    for kind, (logical, _) in TURNS.items():
        column = fields.get(logical, FIELDS[kind][logical])
        if column not in columns or column in done:
            continue
        done.add(column)
        style = _turn_style(rows, column) or kind
        turn_field = TURNS[style][0]
        renames = {turn_field: column} if column != FIELDS[style][turn_field] else {}
        keys = "/".join(TURNS[style][1])
        fits.append((style, renames, f"column '{column}'" + (f" with {keys} turns" if style != kind else "")))
    return fits


def _turn_style(rows: list[dict], column: str) -> str | None:
    """``chat`` or ``sharegpt`` from the first turn found in ``column``; None when no row shows one."""
    for row in rows:
        turns = row.get(column)
        if isinstance(turns, str):  # a CSV cell holding JSON
            try:
                turns = json.loads(turns)
            except json.JSONDecodeError:
                continue
        if isinstance(turns, list) and turns and isinstance(turns[0], dict):
            for kind, (_, keys) in TURNS.items():
                if all(k in turns[0] for k in keys):
                    return kind
    return None


def _expected(fields: dict[str, str]) -> str:
    """Each kind with the columns it reads (required, then [optional]), after the user's renames."""
    parts = []
    for kind in AUTO_ORDER:
        names = FIELDS[kind]
        required = [fields.get(n, names[n]) for n in REQUIRED[kind]]
        optional = [fields.get(n, names[n]) for n in names if n not in REQUIRED[kind]]
        turns = f" ({'/'.join(TURNS[kind][1])} turns)" if kind in TURNS else ""
        parts.append(f"{kind}: {', '.join(required)}{turns}" + (f" [{', '.join(optional)}]" if optional else ""))
    return "; ".join(parts)


def _example(columns: list[str]) -> str:
    """A command-line fix built from the file's own column names."""
    if len(columns) >= 2:
        return f"data.kind=qa data.fields.prompt={columns[0]} data.fields.response={columns[1]}"
    if columns:
        return f"data.kind=text data.fields.text={columns[0]}"
    return "data.kind=qa data.fields.prompt=<column> data.fields.response=<column>"
