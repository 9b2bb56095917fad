"""One generation at a time: the gate requests queue at, and the job that runs in the worker thread.

Why one worker thread and a gate: a model computes one response at a time (a second one
would fight the first for the same cores and the same KV cache, and PEFT's active adapter is
model state). Requests queue on an asyncio lock in arrival order; beyond ``serve.queue``
waiting ones a client gets 429 with Retry-After at once instead of a timeout later. The
backend's token iterator runs in the worker thread, so the event loop keeps answering
/health, /v1/models and adapter switches while a response streams. A client that goes away
stops its generation at the next token and frees the slot.
"""

from __future__ import annotations

import asyncio
import threading

from engine.serve.backend import Backend, GenerateRequest, Piece
from engine.serve.openai import ApiError

_DONE = object()


class Gate:
    """One generation at a time; at most ``waiting`` more in line (429 beyond)."""

    def __init__(self, waiting: int):
        self.lock = asyncio.Lock()  # FIFO: requests run in arrival order
        self.limit = waiting + 1
        self.inside = 0

    def enter(self) -> None:
        if self.inside >= self.limit:
            raise ApiError(
                429,
                f"The server is busy: {self.limit - 1} requests are already waiting for the model. Retry shortly.",
                type="rate_limit_error",
                code="queue_full",
                headers={"Retry-After": "1"},
            )
        self.inside += 1

    def leave(self) -> None:
        self.inside -= 1


class Job:
    """One generation: the backend's iterator driven in the worker thread, its pieces handed
    to the event loop through a queue. ``cancel`` stops it at the next token."""

    def __init__(self, backend: Backend, request: GenerateRequest, loop: asyncio.AbstractEventLoop, on_end):
        self.backend, self.request, self.loop, self.on_end = backend, request, loop, on_end
        self.queue: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()

    def run(self) -> None:
        """In the worker thread."""
        pieces = None
        try:
            pieces = self.backend.generate(self.request)
            for piece in pieces:
                if self.cancelled.is_set():
                    break
                self._hand(piece)
        except BaseException as e:  # handed to the route, which answers in OpenAI's shape
            self._hand(e)
        finally:
            if pieces is not None and hasattr(pieces, "close"):
                pieces.close()  # a generator stops decoding and leaves its adapter context
            # Free the slot and end the stream in one loop callback, the slot first: the route
            # cannot answer before the slot is free, so a client's next request never finds its
            # own finished one still holding the model (two callbacks from this thread could be
            # split by a thread switch, and the answer could go out between them).
            self._call(self._finish)

    def _finish(self) -> None:
        """On the loop: free the slot, then hand the end of the stream to the route."""
        self.on_end()
        self.queue.put_nowait(_DONE)

    def _call(self, fn) -> None:
        try:
            self.loop.call_soon_threadsafe(fn)
        except RuntimeError:
            pass

    def _hand(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the loop closed (shutdown): nobody is listening
            self.cancelled.set()

    def cancel(self) -> None:
        self.cancelled.set()

    async def next(self) -> Piece | None:
        """The next piece; None when the generation has ended; the backend's exception re-raised."""
        item = await self.queue.get()
        if item is _DONE:
            self.queue.put_nowait(_DONE)  # ended stays ended
            return None
        if isinstance(item, BaseException):
            raise item
        return item
