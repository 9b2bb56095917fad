"""Dataset shapes: how one row becomes a conversation (a list of role/content messages).

The ``data`` group's ``kind`` names the shape. A builder gets the row and returns the
messages, or raises ``RowError`` with a reason (the row is then rejected, not lost).
Text is normalised here, once, so duplicates are found after normalisation.

Other column names are a mapping, not a shape: ``kind: qa`` with
``fields: {prompt: q, response: a}`` reads columns ``q``/``a`` (any shape accepts
``fields`` for its own logical fields; see ``engine.data.spec.FIELDS``).
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass

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


_BLANKS = re.compile(r"(?<=\S)[ \t]+")
_LINES = re.compile(r"\n{3,}")
_CHANGED_BY_NORMALIZE = ("\r", "\t", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x1f", "  ", " \n", "\n\n\n")
"""What ``normalize`` would change in ASCII text (besides its ends)."""


def normalize(text: str) -> str:
    """Unicode NFC, one kind of newline, no trailing or repeated blanks; indentation kept (code).

    Most text is already normal: plain ASCII without any of ``_CHANGED_BY_NORMALIZE`` is returned
    as it is (a million-row preparation spends its time elsewhere).
    """
    if text.isascii() and text == text.strip() and not any(s in text for s in _CHANGED_BY_NORMALIZE):
        return text
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = text.replace("\u00a0", " ").replace("\u200b", "").replace("\ufeff", "")
    lines = [_BLANKS.sub(" ", line).rstrip() for line in text.split("\n")]
    return _LINES.sub("\n\n", "\n".join(lines)).strip()


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


# ---------------------------------------------------------------- preference pairs


@dataclass(frozen=True)
class Pair:
    """A preference row: the prompt turns, then a chosen and a rejected answer to them.

    Why one object and not two conversations: the pair is one example everywhere the data
    pipeline looks (deduplication, the split, rejects), so a pair can never be cut in two.
    """

    prompt: list[dict]
    """system/user turns (earlier assistant turns of a multi-turn prompt included)."""
    chosen: str
    rejected: str

    @property
    def chosen_messages(self) -> list[dict]:
        return [*self.prompt, {"role": "assistant", "content": self.chosen}]

    @property
    def rejected_messages(self) -> list[dict]:
        return [*self.prompt, {"role": "assistant", "content": self.rejected}]

    def as_dict(self) -> dict:
        return {"prompt": self.prompt, "chosen": self.chosen, "rejected": self.rejected}


_ROLES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
}
_HH = re.compile(r"(?:^|\n\n)(Human|Assistant):[ \t]?")


@SHAPES.register("preference", DataSpec)
def preference(spec: DataSpec, row: dict) -> Pair:
    """Preference pairs: prompt/chosen/rejected strings, or chat pairs (message lists sharing their prompt turns).

    Accepted per row: (a) ``prompt``, ``chosen``, ``rejected`` as strings; (b) ``chosen`` and
    ``rejected`` as message lists (role/content or from/value turns, or a JSON string of one)
    that repeat the prompt turns and end with the answer (UltraFeedback), or hold the answer
    alone with the prompt in ``prompt`` (a string or a message list: TRL's conversational
    layout); (c) HH-RLHF strings (``\\n\\nHuman: ... \\n\\nAssistant: ...``) with no prompt column.
    """
    chosen_prompt, chosen = _side(row, spec.column("chosen"))
    rejected_prompt, rejected = _side(row, spec.column("rejected"))
    if chosen_prompt != rejected_prompt:
        raise RowError(
            "prompts differ",
            f"'{spec.column('chosen')}' and '{spec.column('rejected')}' do not share their prompt turns; "
            "a pair compares two answers to the same prompt",
        )
    prompt = chosen_prompt or _prompt_column(row, spec.column("prompt"))
    if prompt[-1]["role"] != "user":
        raise RowError("no user turn before the answer", "the prompt turns must end with a user turn")
    if chosen == rejected:
        raise RowError("chosen equals rejected", "the chosen and the rejected answer are the same text")
    msgs = _with_system(spec, row, prompt, spec.column("system"))
    return Pair(msgs, chosen, rejected)


def _side(row: dict, column: str) -> tuple[list[dict], str]:
    """(prompt turns it repeats, or [] when it holds the answer alone; the answer) of ``chosen``/``rejected``."""
    value = row.get(column)
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            pass  # plain text that starts with a bracket
    if isinstance(value, str) and _HH.match(value.lstrip("\n")):
        value = _hh_turns(value)
    if not isinstance(value, list):
        return [], field_text(row, column)
    turns = _turns(value, column)
    if turns[-1]["role"] != "assistant":
        raise RowError("no assistant turn at the end", f"'{column}' does not end with an assistant turn")
    return turns[:-1], turns[-1]["content"]


def _prompt_column(row: dict, column: str) -> list[dict]:
    value = row.get(column)
    if isinstance(value, list):
        return _turns(value, column)
    return [{"role": "user", "content": field_text(row, column)}]


def _turns(value: list, column: str) -> list[dict]:
    if not value:
        raise RowError("wrong type", f"field '{column}' is an empty list")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise RowError("wrong type", f"{column}[{i}] is {type(m).__name__}, expected an object")
        role_key, text_key = ("from", "value") if "from" in m else ("role", "content")
        role = _ROLES.get(m.get(role_key))
        if role is None:
            valid = ", ".join(_ROLES)
            raise RowError("bad role", f"{column}[{i}].{role_key} is {m.get(role_key)!r}; valid: {valid}")
        out.append({"role": role, "content": field_text(m, text_key, where=f"{column}[{i}].")})
    if any(m["role"] == "system" for m in out[1:]):
        raise RowError("bad role", "a system message may only come first")
    return out


def _hh_turns(text: str) -> list[dict]:
    """Anthropic HH-RLHF's transcript strings as turns (the last Assistant turn is the answer)."""
    parts = _HH.split(text.lstrip("\n"))
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[who], "content": said} for who, said in zip(parts[1::2], parts[2::2], strict=True)]
