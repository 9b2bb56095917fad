"""What a request may send and cost, checked before it waits for the model.

The key (constant-time), the body size (413 before it is all read), and the prompt's tokens
against the context (OpenAI's ``context_length_exceeded``, with the numbers). All of these
are O(body): nothing here tokenizes, so a hostile request is refused for the price of reading it.
"""

from __future__ import annotations

import hmac
from typing import Any

from fastapi import Request

from engine.serve.openai import ApiError, ChatRequest, parse_body


def check_key(request: Request, key: bytes | None) -> None:
    """401 in OpenAI's shape unless ``Authorization: Bearer <key>`` is sent (no key configured: anyone)."""
    if key is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    if not header:
        raise ApiError(
            401,
            "You didn't provide an API key. Send it in an Authorization header: 'Authorization: Bearer <key>'.",
            code="missing_api_key",
        )
    # Constant time: the comparison's duration says nothing about how much of the key matched.
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key):
        raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key")


async def read_body(request: Request, limit: int) -> Any:
    """The parsed JSON body; 413 as soon as it is known to be longer than ``limit`` bytes."""
    too_large = ApiError(413, f"The request body is larger than this server accepts ({limit} bytes).", code="request_too_large")
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise too_large
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > limit:
            raise too_large
    return parse_body(bytes(data))


def prompt_limit(body, context: int, param: str) -> int:
    """The most prompt tokens this request may have (before the queue, in O(body))."""
    wanted = body.wanted_tokens()
    if isinstance(body, ChatRequest) and len(body.messages) > context:
        raise ApiError(
            400,
            f"This model's maximum context length is {context} tokens, and each of your {len(body.messages)} messages "
            f"takes at least one. Please send fewer messages (at most {context}).",
            param=param,
            code="context_length_exceeded",
        )
    return context - (wanted or 1)


def too_long(context: int, n: int, wanted: int | None, param: str, *, at_least: bool = False) -> ApiError:
    """OpenAI's ``context_length_exceeded`` for a prompt of ``n`` (or at least ``n``) tokens."""
    least = "at least " if at_least else ""
    return ApiError(
        400,
        f"This model's maximum context length is {context} tokens. However, you requested {least}{n + (wanted or 0)} "
        f"tokens ({least}{n} in the {param}, {wanted or 0} in the completion). "
        f"Please reduce the length of the {param} or completion.",
        param=param,
        code="context_length_exceeded",
    )


def budget(prompt_ids: list[int], wanted: int | None, param: str, *, context: int, default: int) -> int:
    """The completion's length: what was asked, or ``default`` within the context left."""
    n = len(prompt_ids)
    if not prompt_ids:
        raise ApiError(400, f"The {param} is empty: send at least one token of text.", param=param, code="invalid_value")
    if n >= context or (wanted is not None and n + wanted > context):
        raise too_long(context, n, wanted, param)
    return wanted if wanted is not None else min(default, context - n)
