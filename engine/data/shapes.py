"""Dataset shapes: how one row becomes a conversation (a list of role/content messages).

The ``data`` group's ``kind`` names the shape. A builder gets the row and returns the
messages, or raises ``RowError`` with the reason (the row is then rejected, not lost).
"""

from __future__ import annotations

from engine.data.spec import DataSpec
from engine.registry import Registry

SHAPES = Registry("data")


class RowError(ValueError):
    """A row that cannot be used; the message is the reason written to rejected.jsonl."""


def _text(row: dict, key: str, *, required: bool = True) -> str:
    if key not in row or row[key] is None:
        if required:
            raise RowError(f"missing field '{key}'")
        return ""
    value = row[key]
    if not isinstance(value, str):
        raise RowError(f"field '{key}' is {type(value).__name__}, expected a string")
    value = " ".join(value.split()) if "\n" not in value else value.strip()
    if required and not value:
        raise RowError(f"empty field '{key}'")
    return value


def _with_system(spec: DataSpec, messages: list[dict]) -> list[dict]:
    if spec.system_prompt and messages[0]["role"] != "system":
        return [{"role": "system", "content": spec.system_prompt}, *messages]
    return messages


@SHAPES.register("instruction", DataSpec)
def instruction(spec: DataSpec, row: dict) -> list[dict]:
    """Alpaca rows: instruction, optional input, output."""
    f = spec.fields
    prompt = _text(row, f.get("instruction", "instruction"))
    extra = _text(row, f.get("input", "input"), required=False)
    if extra:
        prompt = f"{prompt}\n\n{extra}"
    answer = _text(row, f.get("output", "output"))
    return _with_system(spec, [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}])


@SHAPES.register("qa", DataSpec)
def qa(spec: DataSpec, row: dict) -> list[dict]:
    """Question/answer rows (columns renamed with data.fields.prompt / .response)."""
    f = spec.fields
    q = _text(row, f.get("prompt", "question"))
    a = _text(row, f.get("response", "answer"))
    return _with_system(spec, [{"role": "user", "content": q}, {"role": "assistant", "content": a}])


@SHAPES.register("chat", DataSpec)
def chat(spec: DataSpec, row: dict) -> list[dict]:
    """OpenAI-style ``messages`` lists (system/user/assistant)."""
    msgs = row.get(spec.fields.get("messages", "messages"))
    if not isinstance(msgs, list) or not msgs:
        raise RowError("missing or empty 'messages' list")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise RowError(f"messages[{i}] needs role system/user/assistant")
        out.append({"role": m["role"], "content": _text(m, "content")})
    if out[-1]["role"] != "assistant":
        raise RowError("conversation does not end with an assistant turn")
    return _with_system(spec, out)
