"""The scheduler: one thread drives the backend's batch; requests join it and leave it between steps.

Why one thread: a batch is one model's state (its KV cache, PEFT's active adapters,
llama.cpp's context), so one thread owns it. Requests wait in arrival order for a place in
the batch (``serve.max_batch``); beyond ``serve.queue`` waiting ones a client gets 429 with
Retry-After at once instead of a timeout later (``Gate``). Each step hands every running
request its next piece through the event loop, so the loop keeps answering /health,
/v1/models and adapter switches while responses stream. A client that goes away is dropped
from the batch at the next step and frees its place; the others go on undisturbed.
Work that changes the model (loading an adapter) runs on the same thread between two steps
(``call``), never during one.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import threading

from engine.serve.backend import GenerateRequest, Piece
from engine.serve.batch import Batch
from engine.serve.openai import ApiError

log = logging.getLogger("engine.serve")

_DONE = object()


class Gate:
    """At most ``running`` requests in the batch and ``waiting`` more in line (429 beyond)."""

    def __init__(self, running: int, waiting: int):
        self.limit = running + waiting
        self.waiting = waiting
        self.inside = 0

    def enter(self) -> None:
        if self.inside >= self.limit:
            raise ApiError(
                429,
                f"The server is busy: {self.waiting} requests are already waiting for the model. Retry shortly.",
                type="rate_limit_error",
                code="queue_full",
                headers={"Retry-After": "1"},
            )
        self.inside += 1

    def leave(self) -> None:
        self.inside -= 1


class Job:
    """One request's generation: the scheduler hands its pieces to the event loop through a
    queue; ``cancel`` drops it from the batch at the next step."""

    def __init__(self, request: GenerateRequest, loop: asyncio.AbstractEventLoop, on_end):
        self.request, self.loop, self.on_end = request, loop, on_end
        self.queue: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()
        self.ended = False

    def hand(self, item) -> None:
        """From the scheduler thread: a piece or an exception for the route."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the loop closed (shutdown): nobody is listening
            self.cancelled.set()

    def end(self) -> None:
        """From the scheduler thread, once: free the place, then end the stream, in one loop callback.

        The place first: the route cannot answer before it is free, so a client's next request
        never finds its own finished one still holding a place (two callbacks from this thread
        could be split by a thread switch, and the answer could go out between them)."""
        if self.ended:
            return
        self.ended = True

        def finish() -> None:
            self.on_end()
            self.queue.put_nowait(_DONE)

        try:
            self.loop.call_soon_threadsafe(finish)
        except RuntimeError:
            pass

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


class Scheduler:
    """The thread that owns a batch: admits waiting jobs, steps, hands out pieces, runs ``call`` s."""

    def __init__(self, batch: Batch, *, name: str = "engine-serve"):
        self.batch = batch
        self.cond = threading.Condition()
        self.waiting: collections.deque[Job] = collections.deque()
        self.tasks: collections.deque[tuple] = collections.deque()
        self.running: dict[int, Job] = {}
        self.steps = 0
        self.closed = False
        self.thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        with self.cond:
            self.waiting.append(job)
            self.cond.notify()

    def call(self, fn) -> concurrent.futures.Future:
        """Run ``fn`` on the scheduler's thread between two steps (it may change the model)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self.cond:
            if self.closed:
                raise RuntimeError("the server is shutting down")
            self.tasks.append((fn, future))
            self.cond.notify()
        return future

    def close(self) -> None:
        """Stop after the current step; jobs still waiting or running end (their streams close)."""
        with self.cond:
            self.closed = True
            self.cond.notify()
        self.thread.join(timeout=60)

    # --- the thread -----------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self.cond:
                while not (self.closed or self.waiting or self.tasks or self.running):
                    self.cond.wait()
                if self.closed:
                    break
                tasks = list(self.tasks)
                self.tasks.clear()
                room = self.batch.size - len(self.running)
                joining = [self.waiting.popleft() for _ in range(min(room, len(self.waiting)))]
            for fn, future in tasks:
                self._run_task(fn, future)
            for job in joining:
                self._admit(job)
            self._drop_cancelled()
            if self.running:
                self._step()
        self._end_all()

    @staticmethod
    def _run_task(fn, future: concurrent.futures.Future) -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn())
        except BaseException as e:  # handed to the caller, which answers in OpenAI's shape
            future.set_exception(e)

    def _admit(self, job: Job) -> None:
        if job.cancelled.is_set():
            job.end()
            return
        try:
            slot = self.batch.add(job.request)
        except BaseException as e:  # a request this model cannot serve: its 400 alone
            job.hand(e)
            job.end()
            return
        self.running[slot] = job

    def _drop_cancelled(self) -> None:
        for slot, job in list(self.running.items()):
            if job.cancelled.is_set():
                self.batch.drop(slot)
                del self.running[slot]
                job.end()

    def _step(self) -> None:
        try:
            out = self.batch.step()
        except BaseException as e:  # the step itself failed: every running request gets it
            # Logged by type only: the routes log each request's error, scrubbed of local paths (guard.py).
            log.error("serve: a batch step failed (%s); its %d requests end", type(e).__name__, len(self.running))
            for slot, job in self.running.items():
                self.batch.drop(slot)
                job.hand(e)
                job.end()
            self.running.clear()
            return
        self.steps += 1
        for slot, item in out.items():
            job = self.running.get(slot)
            if job is None:
                continue
            job.hand(item)
            if isinstance(item, BaseException) or item.finish_reason:
                del self.running[slot]
                job.end()

    def _end_all(self) -> None:
        """At shutdown: whatever still waits or runs ends now (after the server's grace period)."""
        for slot, job in list(self.running.items()):
            self.batch.drop(slot)
            job.end()
        self.running.clear()
        while self.waiting:
            self.waiting.popleft().end()
        while self.tasks:
            _, future = self.tasks.popleft()
            future.cancel()
