"""OpenAI's request bodies and error shape, as the routes check them.

Why our own models instead of OpenAI's: clients send what the official API accepts, and get
what the official API would answer — the same 400 with the parameter named for a wrong type
or range (temperature in [0, 2], top_p in (0, 1], max_tokens >= 1, n = 1), unknown fields
ignored. Numbers and flags are strict: ``"0.5"`` is a wrong type here as it is there.
Every error body is ``{"error": {"message", "type", "param", "code"}}``; no message carries a
local path (``scrub``) or a traceback.

Why a body is inspected before the models see it (``parse_body``): text that is not valid
Unicode (a lone surrogate such as ``"\\ud800"``, which JSON may carry) makes tokenizers and the
JSON encoder of an error body raise, and JSON nested thousands of levels deep makes the parser
and ``repr`` recurse past Python's limit. Both are the client's to fix, so both are a 400 that
names where in the body the problem is, before anything else runs.
"""

from __future__ import annotations

import json
import math
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError, field_validator, model_validator

Number = Annotated[float, Field(strict=True)]  # JSON ints and floats, never strings
TokenId = Annotated[int, Field(strict=True, ge=0, le=2**31 - 1)]  # llama.cpp's llama_token is an int32
MAX_SCALE = 10.0
"""Largest adapter scale (either sign). A LoRA's usual scale is 0 to 2 (negative subtracts it);
far beyond, the adapter swamps the base and activations overflow into inf/NaN."""


class ApiError(Exception):
    """An error response in OpenAI's shape: raised anywhere in a route, rendered by the app."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        # param may echo a client's key: scrubbed too, so no error body ever shows a path
        self.status, self.message, self.type, self.code = status, scrub(message), type, code
        self.param = scrub(param) if param is not None else None
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# Two or more path components, with or without a drive letter: /home/u/x, C:\data\y.
_PATH = re.compile(r"(?:[A-Za-z]:)?(?:[\\/][^\s'\"\\/:,;()\[\]]+){2,}[\\/]?")
ROUTES = ("/v1/", "/lora-adapters", "/health", "/ui/")
"""The server's own URL paths: a message naming one (``GET /v1/models lists ...``) keeps it whole."""


def scrub(message: str) -> str:
    """A message with every local path cut down to its last component (``.../name``); the
    server's own routes (``ROUTES``) are URLs, not local paths, and stay as they are."""

    def cut(m: re.Match) -> str:
        if m.group(0).startswith(ROUTES):
            return m.group(0)
        return ".../" + re.split(r"[\\/]", m.group(0).rstrip("\\/"))[-1]

    return _PATH.sub(cut, message)


MAX_DEPTH = 32
"""Deepest nesting of arrays and objects a body may have. OpenAI's bodies need 4 (messages[0].
content[0].text); tool schemas a few more. Deeper is refused before any model validates it."""
_SURROGATE = re.compile("[\ud800-\udfff]")


def parse_body(data: bytes) -> Any:
    """JSON bytes -> the value, refused with a 400 when it is not JSON, nests deeper than
    ``MAX_DEPTH`` or holds text that is not valid Unicode (a lone surrogate), with the place named."""
    try:
        value = json.loads(data)
    except RecursionError:
        raise _too_deep("body") from None
    except (ValueError, UnicodeDecodeError):
        raise ApiError(
            400,
            "We could not parse the JSON body of your request. The API expects a JSON payload; what was sent was not valid JSON.",
            code="invalid_json",
        ) from None
    inspect(value)
    return value


def inspect(value: Any) -> None:
    """Walk a parsed body without recursion: depth and Unicode checked at every string and key."""
    stack: list[tuple[Any, str, int]] = [(value, "", 0)]
    while stack:
        item, where, depth = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                raise _not_unicode(where or "body")
            continue
        if not isinstance(item, (dict, list)):
            continue
        if depth >= MAX_DEPTH:
            raise _too_deep(where or "body")
        if isinstance(item, dict):
            for key, v in item.items():
                shown = key if len(key) <= 40 else key[:40] + "..."  # named in the error: kept short
                child = f"{where}.{shown}" if where else shown
                if _SURROGATE.search(key):
                    raise _not_unicode(where or "body", key=True)
                stack.append((v, child, depth + 1))
        else:
            stack.extend((v, f"{where}[{i}]", depth + 1) for i, v in enumerate(item))


def _too_deep(where: str) -> ApiError:
    return ApiError(
        400,
        f"Invalid '{where}': the JSON nests more than {MAX_DEPTH} levels of arrays and objects; "
        "OpenAI's request bodies need a handful, send a flatter body.",
        param=where,
        code="invalid_value",
    )


def _not_unicode(where: str, *, key: bool = False) -> ApiError:
    what = "a key in it" if key else "the text"
    return ApiError(
        400,
        f"Invalid '{where}': {what} holds a lone UTF-16 surrogate (such as \\ud800), which is not valid "
        "Unicode; send UTF-8 text (a character beyond U+FFFF as one \\uXXXX\\uXXXX pair, high then low).",
        param=where,
        code="invalid_value",
    )


class _Body(BaseModel):
    # OpenAI ignores fields it does not know (clients send vendor extras); so do we.
    model_config = ConfigDict(extra="ignore")


class TextPart(_Body):
    type: Literal["text"]
    text: str


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    """``developer`` is OpenAI's newer name for ``system`` and is rendered as one."""
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(_Body):
    include_usage: StrictBool = False


class _Sampling(_Body):
    model: str
    max_tokens: StrictInt | None = Field(None, ge=1)
    temperature: Number = Field(1.0, ge=0, le=2)
    """0 is greedy."""
    top_p: Number = Field(1.0, gt=0, le=1)
    seed: StrictInt | None = Field(None, ge=-(2**63), le=2**63 - 1)
    """Reproducible sampling: the same seed and body give the same answer (OpenAI's range: int64)."""
    stop: str | list[str] | None = None
    n: StrictInt = 1
    stream: StrictBool = False
    stream_options: StreamOptions | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, value):
        if isinstance(value, list) and len(value) > 4:
            raise ValueError("at most 4 stop sequences are allowed")
        return value

    @field_validator("n")
    @classmethod
    def _one_choice(cls, value: int) -> int:
        if value != 1:
            raise ValueError("only n=1 is supported (one completion per request)")
        return value

    @field_validator("temperature", "top_p")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value

    def stops(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return tuple(s for s in stops if s)

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    """OpenAI's newer name for max_tokens; wins when both are given."""

    def wanted_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[TokenId]
    """A string, one string in a list, or token ids (each below the model's vocabulary size, checked on arrival)."""
    max_tokens: StrictInt | None = Field(16, ge=1)
    """OpenAI's default for completions is 16 tokens."""

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value):
        if isinstance(value, list) and value and isinstance(value[0], str) and len(value) != 1:
            raise ValueError("one prompt per request (n=1, no batches): send a string or a list of one string")
        if isinstance(value, list) and not value:
            raise ValueError("the prompt is empty")
        return value

    def wanted_tokens(self) -> int | None:
        return self.max_tokens


class AdapterItem(_Body):
    """One adapter of a POST /lora-adapters body: by llama.cpp's ``id``, by ``name`` or by ``path``."""

    id: StrictInt | None = None
    name: str | None = None
    path: str | None = None
    scale: Number = Field(1.0, ge=-MAX_SCALE, le=MAX_SCALE)

    @field_validator("scale")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value

    @model_validator(mode="after")
    def _named(self):
        if self.id is None and self.name is None and self.path is None:
            raise ValueError("each adapter needs an 'id', a 'name' or a 'path'")
        return self


MAX_SET = 16
"""Most adapters in one set (a blend of more is unheard of); each item may load a file."""


class AdapterSet(_Body):
    adapters: list[AdapterItem] = Field(max_length=MAX_SET)


def parse_adapter_set(raw: Any) -> list[AdapterItem]:
    """Seed's ``{"adapters": [...]}`` or llama.cpp server's bare list; ``[]`` clears."""
    if isinstance(raw, list):
        return validate(AdapterSet, {"adapters": raw}, prefix_drop="adapters").adapters
    return validate(AdapterSet, raw).adapters


_CODES = {"missing": "missing_required_parameter", "extra_forbidden": "unknown_parameter"}


def validate(model: type[BaseModel], raw: Any, *, prefix_drop: str | None = None):
    """``model.model_validate`` with the first problem as OpenAI's 400 (param named, no input dump)."""
    if not isinstance(raw, dict):
        raise ApiError(400, "The request body must be a JSON object.", code="invalid_type")
    try:
        return model.model_validate(raw)
    except ValidationError as err:
        e = _most_useful(err.errors())
        loc = [str(p) for p in e["loc"] if not str(p).startswith(("function-", "json-or-python"))]
        param = _param(loc, prefix_drop)
        kind = e["type"]
        if kind == "missing":
            raise ApiError(400, f"Missing required parameter: '{param}'.", param=param, code=_CODES[kind]) from None
        code = (
            "invalid_type"
            if kind.endswith(("_type", "_parsing")) or kind in ("literal_error", "union_tag_invalid")
            else "invalid_value"
        )
        msg = e["msg"].removeprefix("Value error, ").replace("Input should be", "should be")
        got = e.get("input")
        shown = repr(got) if len(repr(got)) <= 40 else type(got).__name__
        raise ApiError(400, f"Invalid '{param}': {msg} (got {shown}).", param=param, code=code) from None


def _most_useful(errors: list[dict]) -> dict:
    """A union's first branch error says little ('should be a string' for a list of parts):
    prefer the error that went deepest into the value, then a range error over a type error."""
    return max(errors, key=lambda e: (len(e["loc"]), not e["type"].endswith("_type")))


def _param(loc: list[str], drop: str | None) -> str:
    # Union branch names (``str``, ``list[TextPart]``) are pydantic's, not the client's keys.
    parts = [p for p in loc if not re.fullmatch(r"str|int|float|bool|list\[.*\]|[A-Z]\w*|constrained-\w+", p)]
    if drop and parts and parts[0] == drop:
        parts = parts[1:]
    out = ""
    for p in parts:
        out += f"[{p}]" if p.isdigit() else (f".{p}" if out else p)
    return out or "body"
