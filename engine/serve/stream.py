"""A started generation as OpenAI's answer: one JSON object, or server-sent events as tokens come.

Streams carry a role chunk first (chat), then a chunk per piece of text, a chunk with the
finish reason, a usage chunk when ``stream_options.include_usage`` asks, and ``[DONE]``. Once
the headers are out an error can only go in the stream, in OpenAI's error shape, as OpenAI does.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator

from fastapi.responses import StreamingResponse

from engine.errors import UserError
from engine.serve.backend import Piece
from engine.serve.guard import internal
from engine.serve.openai import ApiError
from engine.serve.worker import Job


async def respond(body, job: Job, first: Piece | None, n_prompt: int, *, chat: bool):
    """The whole answer (``body.stream`` false) or a ``StreamingResponse``; the job is cancelled when either ends."""
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    shape = Shape(rid, int(time.time()), body.model, chat)
    if not body.stream:
        pieces = [first] if first else []
        try:
            while (piece := await job.next()) is not None:
                pieces.append(piece)
        except UserError as e:
            raise ApiError(400, str(e)) from None
        finally:
            job.cancel()
        text = "".join(p.text for p in pieces)
        finish = next((p.finish_reason for p in reversed(pieces) if p.finish_reason), "stop")
        used = sum(len(p.token_ids) for p in pieces)
        return shape.whole(text, finish, usage(n_prompt, used))
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(_events(body, job, first, n_prompt, shape), media_type="text/event-stream", headers=headers)


async def _events(body, job: Job, first: Piece | None, n_prompt: int, shape: Shape) -> AsyncIterator[str]:
    chat, used = shape.chat, 0
    try:
        if chat:
            yield sse(shape.chunk({"role": "assistant", "content": ""}, None))
        piece = first
        while piece is not None:
            used += len(piece.token_ids)
            if piece.text or piece.finish_reason:
                if piece.text:
                    yield sse(shape.chunk({"content": piece.text} if chat else piece.text, None))
                if piece.finish_reason:
                    yield sse(shape.chunk({} if chat else "", piece.finish_reason))
            piece = await job.next()
        if body.include_usage():
            yield sse(shape.usage_chunk(usage(n_prompt, used)))
        yield "data: [DONE]\n\n"
    except Exception as e:  # headers are sent: the error goes in the stream, as OpenAI does
        err = ApiError(400, str(e)) if isinstance(e, UserError) else internal(e)
        yield sse(err.body())
    finally:
        job.cancel()  # a client gone mid-stream: stop at the next token, free the slot


class Shape:
    """OpenAI's response objects for one request (chat.completion / text_completion and their chunks)."""

    def __init__(self, rid: str, created: int, model: str, chat: bool):
        self.rid, self.created, self.model, self.chat = rid, created, model, chat

    def _head(self, obj: str) -> dict:
        return {"id": self.rid, "object": obj, "created": self.created, "model": self.model, "system_fingerprint": None}

    def whole(self, text: str, finish: str, usage: dict) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": finish}
            return self._head("chat.completion") | {"choices": [choice], "usage": usage}
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        return self._head("text_completion") | {"choices": [choice], "usage": usage}

    def chunk(self, delta, finish: str | None) -> dict:
        if self.chat:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return self._head("chat.completion.chunk") | {"choices": [choice]}
        choice = {"index": 0, "text": delta, "logprobs": None, "finish_reason": finish}
        return self._head("text_completion") | {"choices": [choice]}

    def usage_chunk(self, usage: dict) -> dict:
        return self._head("chat.completion.chunk" if self.chat else "text_completion") | {"choices": [], "usage": usage}


def usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
