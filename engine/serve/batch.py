"""Continuous batching: the contract a backend's batch keeps, and how one request runs alone.

Why: decoding a small model is bound by reading its weights once per step. One step that
carries 8 sequences reads them once for all 8, so the same machine serves several times the
tokens. Requests join a running batch at the next step and leave it when they finish;
nobody waits for the longest response of a fixed batch.

A backend's ``Batch`` holds up to ``size`` sequences. One thread drives it (the server's
scheduler, engine/serve/worker.py, or ``alone`` below), so a batch is never called from two
threads at once:

  ``add(request) -> slot``  checks the request (a ``UserError`` is that request's 400 alone)
                            and takes a slot; nothing is computed yet.
  ``step() -> {slot: out}`` one round for every slot: a chunk of a new prompt (at most
                            ``prefill_chunk`` tokens, so one long prompt does not stall the
                            other streams for its whole length) or one token of a decoding
                            sequence. ``out`` is a ``Piece`` (one per generated token, its text
                            possibly empty while held back), or an exception for that slot
                            alone (e.g. non-finite scores under its adapter set). A piece with
                            ``finish_reason`` or an exception ends the slot; its cache is freed.
  ``drop(slot)``            ends a slot early (the client left); dropping an ended slot is a no-op.
  ``live()``                the slots that hold a sequence now.

Same answer alone or in company: every sequence keeps its own sampling state (seed,
temperature, top_p, stop strings) and its own adapter set, fixed when it was added; which
other sequences share a step changes only the order of floating-point sums (stated per
backend in docs/serving.md).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from engine.serve.backend import GenerateRequest, Piece


class Batch(Protocol):
    size: int
    """Most sequences at once (``serve.max_batch``)."""

    def add(self, request: GenerateRequest) -> int:
        """Check the request and give it a free slot (the caller never adds past ``size``)."""

    def step(self) -> dict[int, Piece | BaseException]:
        """One round; see the module doc."""

    def drop(self, slot: int) -> None:
        """End a slot early and free what it holds."""

    def live(self) -> list[int]:
        """The slots that hold a sequence now."""


def alone(batch: Batch, request: GenerateRequest) -> Iterator[Piece]:
    """One request through a batch, as its only sequence: the backend's ``generate``.

    The request is checked on the call (a bad one raises before anything streams); the
    pieces come as the iterator is read, and closing it early drops the slot.
    """
    slot = batch.add(request)

    def pieces() -> Iterator[Piece]:
        try:
            while True:
                out = batch.step().get(slot)
                if out is None:
                    if slot not in batch.live():  # ended by someone else: never wait for it forever
                        raise RuntimeError("this generation was ended by another one on the same backend")
                    continue  # its prompt is still being read
                if isinstance(out, BaseException):
                    raise out
                yield out
                if out.finish_reason:
                    return
        finally:
            batch.drop(slot)

    return pieces()
