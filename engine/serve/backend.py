"""The contract between the HTTP layer and a model backend.

Why one small protocol: the routes (engine/serve/app.py), the terminal chat and the adapter
QA matrix all drive a model the same way (render a chat, generate a stream of text pieces
with a given adapter set), and each backend (llama.cpp, transformers) does it its own way.

Concurrency contract: the server drives a backend's ``batch`` from one scheduler thread
(engine/serve/worker.py): requests join and leave the running batch between steps, so a
backend never sees two threads generate at once. The adapter set of a request is fixed
when it is added (``GenerateRequest.adapters``): switching the server's active set never
changes a running response, and each sequence of a batch decodes with its own set.

How a backend is opened: every kind registers one builder in ``SERVERS`` under its preset's
``kind`` (engine/serve/backends/<kind>.py), all with one signature,
``build_<kind>(spec, *, source: BackendSource, adapters: dict[str, Found]) -> Opened``. The
source is the same for every kind; each builder reads what it needs from it (hf: the model and
quantization specs and the evaluated run's PEFT dirs; llamacpp: a GGUF base and the run's GGUF
LoRA). ``engine.serve.backends.open_backend`` is the one caller.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from engine.errors import UserError

if TYPE_CHECKING:
    from engine.serve.batch import Batch


@dataclass(frozen=True)
class AdapterScale:
    """One adapter of an active set: its name (as listed by ``adapters()``) and its scale."""

    name: str
    scale: float = 1.0


@dataclass(frozen=True)
class AdapterInfo:
    """A loaded adapter: what /v1/models and /lora-adapters show (never a local path)."""

    name: str
    format: str
    """``gguf`` or ``peft``."""
    run: str | None = None
    """Run dir name it came from (no path), if known."""
    recipe: str | None = None
    """Recipe of that run, if known."""


@dataclass(frozen=True)
class GenerateRequest:
    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    adapters: tuple[AdapterScale, ...] = ()
    """The adapter set for this whole response (empty: the base alone)."""


@dataclass
class Piece:
    """A piece of a streamed completion; the last one has ``finish_reason`` set."""

    text: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    """``stop`` (EOS or a stop string) or ``length`` (max_tokens or the context end)."""


class Backend(Protocol):
    model_id: str
    """Name of the base model as /v1/models lists it."""
    context_length: int
    batch: Batch
    """The backend's one batch (``serve.max_batch`` sequences, engine/serve/batch.py): the server's
    scheduler drives it; ``generate`` runs one request through it alone."""

    def tokenize(self, text: str, *, limit: int | None = None) -> list[int]:
        """Plain text -> ids (completions); special tokens in the text are parsed. With ``limit``,
        a text that certainly holds more tokens (``TokenFloor``) raises ``PromptTooLong`` before
        the tokenizer runs."""

    def render_chat(self, messages: list[dict], *, limit: int | None = None) -> list[int]:
        """Messages -> prompt ids through the model's own chat template (sandboxed jinja),
        with the assistant turn opened; ``limit`` as for ``tokenize``."""

    def generate(self, request: GenerateRequest) -> Iterator[Piece]:
        """Stream the completion (``batch.alone`` over ``batch``). Stop strings are honoured here (text never passes one).

        Yield a piece per generated token (its text may be empty while held back): the app
        checks between pieces whether the client is still there and counts ``token_ids`` for
        ``usage``. Raise ``UserError`` for a request this model cannot serve (a 400)."""

    def load_adapter(self, name: str, path, *, run: str | None = None, recipe: str | None = None) -> AdapterInfo:
        """Load an adapter file/dir (already checked to be inside the allowed dirs); ``run`` and
        ``recipe`` say where it came from (shown by /v1/models). A file that is no adapter for
        this base raises ``UserError`` with a message free of local paths."""

    def adapters(self) -> list[AdapterInfo]:
        """Loaded adapters, in load order."""

    def close(self) -> None:
        """Free the model (llama.cpp wants an explicit close before interpreter exit)."""


@dataclass(frozen=True)
class BackendSource:
    """What a backend serves besides its preset: one shape for every kind, plain values only."""

    model: Any
    """The model group's spec: the base (after a full fine-tune, validation points it at the run's model/)."""
    quantization: Any = None
    """The quantization group's spec: how the run built the base (hf de-quantizes it, as export does); None: none."""
    adapter: Any = None
    """The adapter group's spec; a layered run's ``scales`` weigh its levels."""
    evaluated: Path | None = None
    """The finished run of ``eval.run_dir``: its trained weights load, active for the base's id."""
    out_dir: Path | None = None
    """This run's dir: where a backend writes what it must make first (llamacpp: the run's LoRA as GGUF)."""

    @property
    def scales(self) -> list[float] | None:
        """The level scales of a layered adapter (None: as trained)."""
        return list(getattr(self.adapter, "scales", None) or []) or None

    @property
    def template(self) -> str | None:
        """The chat template the evaluated run trained with, as it recorded it beside its weights; None
        (no run, or one from before the record): the backend's own (the tokenizer's, the GGUF's)."""
        from engine.data.templates import recorded_template

        return recorded_template(self.evaluated)


@dataclass
class Opened:
    """A built backend and the adapter set it starts with."""

    backend: Backend
    """Every adapter of serve.adapters and of the evaluated run loaded, none active yet."""
    active: tuple[AdapterScale, ...] = ()
    """The set requests to the base's id get at start: the evaluated run's adapter (a layered run's
    levels with their scales), else none."""


class PromptTooLong(UserError):
    """A prompt that holds at least ``floor`` tokens, more than the ``limit`` it was given."""

    def __init__(self, floor: int, limit: int):
        super().__init__(f"the prompt holds at least {floor} tokens; at most {limit} fit")
        self.floor, self.limit = floor, limit


class TokenFloor:
    """At least how many tokens a text becomes: one regex pass over it, no tokenizer run.

    Why: tokenizers cost time at least linear in the text, and llama.cpp's special-token
    parsing is quadratic in the number of special tokens (20,000 one-letter chat messages:
    ~29 s). A text whose floor is past the context is refused without that cost.

    The bound: every occurrence of a special token's text is one token, and every other
    token covers at most ``longest`` units of the rest (bytes for llama.cpp, whose pieces are
    bytes; characters for transformers, whose token strings hold one character per byte or
    per character consumed). Special texts that overlap each other could make the count of
    occurrences an over-count; no vocabulary seen here has such.
    """

    def __init__(self, specials: Iterable[str], longest: int, *, in_bytes: bool):
        texts = sorted({s for s in specials if s}, key=len, reverse=True)
        self.special = re.compile("|".join(map(re.escape, texts))) if texts else None
        self.longest, self.in_bytes = max(1, longest), in_bytes

    def __call__(self, text: str) -> int:
        parts = self.special.split(text) if self.special is not None else [text]
        size = sum(len(p.encode("utf-8", "surrogatepass")) if self.in_bytes else len(p) for p in parts)
        return len(parts) - 1 + math.ceil(size / self.longest)

    def check(self, text: str, limit: int | None) -> None:
        """Raise ``PromptTooLong`` when ``text`` certainly holds more than ``limit`` tokens."""
        if limit is not None and (floor := self(text)) > limit:
            raise PromptTooLong(floor, limit)


def check_ids(ids: list[int], vocab: int) -> None:
    """Token ids a model can embed, or a ``UserError`` naming the first that is not."""
    bad = next(((i, t) for i, t in enumerate(ids) if not 0 <= t < vocab), None)
    if bad is not None:
        raise UserError(
            f"token id {bad[1]} at position {bad[0]} of the prompt is outside this model's vocabulary; "
            f"ids run from 0 to {vocab - 1}"
        )
