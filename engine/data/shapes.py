"""Dataset shapes: how one row becomes a conversation (a list of role/content messages).

The ``data`` group's ``kind`` names the shape. A builder gets the row and returns the
messages, or raises ``RowError`` with a reason (the row is then rejected, not lost).
Text is normalised here, once, so duplicates are found after normalisation.

Other column names are a mapping, not a shape: ``kind: qa`` with
``fields: {prompt: q, response: a}`` reads columns ``q``/``a`` (any shape accepts
``fields`` for its own logical fields; see ``engine.data.spec.FIELDS``).
"""

from __future__ import annotations

import re
import unicodedata

from engine.data.spec import AUTO, DataSpec, DocumentsSpec, TextSpec
from engine.registry import Registry

SHAPES = Registry("data")

TEXT_ROLE = "text"
"""Role of the single message of a plain-text example (continued pre-training)."""


class RowError(ValueError):
    """A row that cannot be used. ``reason`` is counted in metrics; ``detail`` says where."""

    def __init__(self, reason: str, detail: str = ""):
        self.reason, self.detail = reason, detail or reason
        super().__init__(self.detail)


def normalize(text: str) -> str:
    """Unicode NFC, one kind of newline, no trailing or repeated blanks; indentation kept (code)."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = text.replace("\u00a0", " ").replace("\u200b", "").replace("\ufeff", "")
    lines = [re.sub(r"(?<=\S)[ \t]+", " ", line).rstrip() for line in text.split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def field_text(row: dict, key: str, *, required: bool = True, where: str = "") -> str:
    """A string field, normalised. Numbers are accepted as text; other types are rejected."""
    name = f"{where}{key}"
    if key not in row or row[key] is None or (not required and row[key] == ""):
        if required:
            has = f" (the row has: {', '.join(map(str, row))}; map one with data.fields.<name>=<column>)" if row else ""
            raise RowError("missing field", f"missing field '{name}'{has}")
        return ""
    value = row[key]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise RowError("wrong type", f"field '{name}' is {type(value).__name__}, expected a string")
    value = normalize(value)
    if required and not value:
        raise RowError("empty field", f"field '{name}' is empty")
    return value


def _with_system(spec: DataSpec, row: dict, messages: list[dict], system_column: str | None = None) -> list[dict]:
    system = field_text(row, system_column, required=False) if system_column else ""
    system = system or spec.system_prompt
    if system and messages[0]["role"] != "system":
        return [{"role": "system", "content": system}, *messages]
    return messages


@SHAPES.register("instruction", DataSpec)
def instruction(spec: DataSpec, row: dict) -> list[dict]:
    """Alpaca rows: instruction, optional input, output (optional system)."""
    prompt = field_text(row, spec.column("instruction"))
    extra = field_text(row, spec.column("input"), required=False)
    if extra:
        prompt = f"{prompt}\n\n{extra}"
    answer = field_text(row, spec.column("output"))
    msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    return _with_system(spec, row, msgs, spec.column("system"))


@SHAPES.register("qa", DataSpec)
def qa(spec: DataSpec, row: dict) -> list[dict]:
    """Question/answer rows; other column names via data.fields.prompt / .response."""
    q = field_text(row, spec.column("prompt"))
    a = field_text(row, spec.column("response"))
    msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return _with_system(spec, row, msgs, spec.column("system"))


def _conversation(spec: DataSpec, row: dict, column: str, role_key: str, text_key: str, roles: dict) -> list[dict]:
    turns = row.get(column)
    if isinstance(turns, str):  # a CSV cell holding JSON
        import json

        try:
            turns = json.loads(turns)
        except json.JSONDecodeError:
            raise RowError("wrong type", f"field '{column}' is text that is not a JSON list") from None
    if turns is None:
        raise RowError("missing field", f"missing field '{column}'")
    if not isinstance(turns, list) or not turns:
        raise RowError("wrong type", f"field '{column}' must be a non-empty list of turns")
    out = []
    for i, m in enumerate(turns):
        if not isinstance(m, dict):
            raise RowError("wrong type", f"{column}[{i}] is {type(m).__name__}, expected an object")
        role = roles.get(m.get(role_key))
        if role is None:
            raise RowError("bad role", f"{column}[{i}].{role_key} is {m.get(role_key)!r}; valid: {', '.join(roles)}")
        out.append({"role": role, "content": field_text(m, text_key, where=f"{column}[{i}].")})
    body = [m for m in out if m["role"] != "system"]
    if not body or body[-1]["role"] != "assistant":
        raise RowError("no assistant turn at the end", "conversation does not end with an assistant turn")
    if any(m["role"] == "system" for m in out[1:]):
        raise RowError("bad role", "a system message may only come first")
    return _with_system(spec, row, out)


@SHAPES.register("chat", DataSpec)
def chat(spec: DataSpec, row: dict) -> list[dict]:
    """OpenAI-style ``messages`` lists (system/user/assistant)."""
    roles = {"system": "system", "user": "user", "assistant": "assistant"}
    return _conversation(spec, row, spec.column("messages"), "role", "content", roles)


@SHAPES.register("sharegpt", DataSpec)
def sharegpt(spec: DataSpec, row: dict) -> list[dict]:
    """ShareGPT ``conversations`` lists of ``{from: human|gpt|system, value}``."""
    roles = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
    return _conversation(spec, row, spec.column("conversations"), "from", "value", roles)


@SHAPES.register("text", TextSpec)
def text(spec: TextSpec, row: dict) -> list[dict]:
    """Plain text for continued pre-training: every token is trained on, no template."""
    return [{"role": TEXT_ROLE, "content": field_text(row, spec.column("text"))}]


@SHAPES.register(AUTO, DataSpec)
def auto(spec: DataSpec, row: dict) -> list[dict]:
    """Any of the shapes above, read from the file's columns at validation (engine.data.detect)."""
    # Validation replaces kind auto by the detected kind, so a validated spec never gets here.
    raise RuntimeError("data kind 'auto' must be resolved by validating the DataSpec first")


@SHAPES.register("documents", DocumentsSpec)
def documents(spec: DocumentsSpec, row: dict) -> list[dict]:
    """Chunks of a folder of .txt/.md/.pdf documents (rows come from engine.data.documents)."""
    return [{"role": TEXT_ROLE, "content": field_text(row, "text")}]
