"""The terminal chat: a conversation with history over any backend, answers streamed as they come.

Why streams as arguments (not ``input()``/``print`` alone): the same loop serves a terminal, a
pipe (``echo hi | python -m engine recipe=chat``: each line a user turn) and a test feeding lines
through ``io.StringIO``. Only a real terminal on ``sys.stdin`` gets ``input()``'s line editing.

Why drop the oldest turns when the context fills: the conversation goes on (the latest question
is what the user cares about) and the drop is said out loud, never silent. The system message
stays; a single message too long for the context is refused with its size.

Ctrl-C while an answer streams stops that answer (what was shown stays in the history);
Ctrl-C or EOF at the prompt ends the chat cleanly, as ``/exit`` does.

``terminal_chat`` is the chat stage's work: the ``serve`` preset's backend opened as the serve
stage opens it (``open_backend``), the ``serve.chat`` settings, then ``chat``.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from engine.errors import UserError
from engine.serve import ServeSpec
from engine.serve.backend import AdapterScale, Backend, BackendSource, GenerateRequest
from engine.serve.backends import open_backend

HELP = """commands:
  /reset                      clear the conversation (the system message stays)
  /adapter                    show the loaded adapters and the active set
  /adapter NAME [SCALE] ...   set the active set: one adapter, or a blend (/adapter a 0.5 b 0.5)
  /adapter none               the base model alone
  /system TEXT                set the system message (/system alone clears it)
  /help                       this list
  /exit                       leave (Ctrl-D and Ctrl-C at the prompt too)
anything else is your next message; Ctrl-C while an answer streams stops it."""

PROMPT = "you> "


@dataclass(frozen=True)
class ChatSettings:
    """How answers are made: plain values (the chat stage reads them from serve.chat)."""

    max_tokens: int
    temperature: float = 0.7
    top_p: float = 0.95
    seed: int | None = None
    system: str | None = None
    adapters: tuple[AdapterScale, ...] = ()
    """The active set at start (empty: the base)."""


@dataclass
class Session:
    """One conversation's state and its commands; ``chat`` drives it line by line."""

    backend: Backend
    settings: ChatSettings
    out: TextIO
    system: str | None = None
    history: list[dict] = field(default_factory=list)
    active: tuple[AdapterScale, ...] = ()
    transcript: Path | None = None
    """A JSON line per answered turn (messages sent, answer, adapter set, timing), if set."""
    turns: int = 0

    def __post_init__(self) -> None:
        self.system = self.settings.system
        self.active = self.settings.adapters

    # --- output ---------------------------------------------------------------------

    def say(self, text: str) -> None:
        """A line from the chat itself (not the model), marked so it never reads as an answer."""
        self.out.write(f"[chat] {text}\n")
        self.out.flush()

    def banner(self) -> None:
        names = [a.name for a in self.backend.adapters()]
        loaded = f"adapters loaded: {', '.join(names)}" if names else "no adapters loaded"
        self.say(f"{self.backend.model_id} ({loaded}; active: {describe(self.active)}). /help lists the commands.")

    # --- one line -------------------------------------------------------------------

    def handle(self, line: str) -> bool:
        """Act on one input line; False when the chat should end."""
        text = line.strip()
        if not text:
            return True
        if text.startswith("/"):
            return self.command(text)
        self.answer(text)
        return True

    def command(self, text: str) -> bool:
        name, _, rest = text.partition(" ")
        rest = rest.strip()
        if name in ("/exit", "/quit"):
            return False
        if name == "/help":
            self.out.write(HELP + "\n")
            self.out.flush()
        elif name == "/reset":
            self.history.clear()
            self.say("conversation cleared")
        elif name == "/system":
            self.system = rest or None
            self.say(f"system message set: {rest}" if rest else "system message cleared")
        elif name == "/adapter":
            self.set_adapters(rest.split())
        else:
            self.say(f"unknown command {name}; /help lists the commands (/reset, /adapter, /system, /exit)")
        return True

    def set_adapters(self, args: list[str]) -> None:
        loaded = [a.name for a in self.backend.adapters()]
        if not args:
            self.say(f"loaded: {', '.join(loaded) or 'none'}; active: {describe(self.active)}")
            return
        if args == ["none"]:
            self.active = ()
            self.say("active: the base model alone")
            return
        try:
            chosen = parse_adapter_args(args, loaded)
        except UserError as e:
            self.say(str(e))
            return
        self.active = chosen
        self.say(f"active: {describe(chosen)}")

    # --- an answer ------------------------------------------------------------------

    def answer(self, text: str) -> None:
        self.history.append({"role": "user", "content": text})
        fitted = self.fit()
        if fitted is None:
            return
        messages, ids = fitted
        budget = min(self.settings.max_tokens, self.backend.context_length - len(ids))
        request = GenerateRequest(
            prompt_ids=ids,
            max_tokens=budget,
            temperature=self.settings.temperature,
            top_p=self.settings.top_p,
            seed=self.settings.seed,
            adapters=self.active,
        )
        parts: list[str] = []
        start, tokens, finish = time.perf_counter(), 0, None
        pieces = self.backend.generate(request)
        try:
            for piece in pieces:
                if piece.text:
                    parts.append(piece.text)
                    self.out.write(piece.text)
                    self.out.flush()
                tokens += len(piece.token_ids)
                finish = piece.finish_reason or finish
        except KeyboardInterrupt:
            finish = "interrupted"
            self.out.write("\n")
            self.say("answer stopped")
        except UserError as e:
            self.out.write("\n")
            self.say(f"error: {e}")
            self.history.pop()
            return
        finally:
            close = getattr(pieces, "close", None)
            if close is not None:
                close()  # a generator stops decoding and leaves its adapter context
        reply = "".join(parts)
        if finish != "interrupted":
            self.out.write("\n")
        if finish == "length":
            self.say(f"answer cut at {tokens} tokens (serve.chat.max_tokens, or the context end)")
        self.out.flush()
        self.history.append({"role": "assistant", "content": reply.strip()})
        self.turns += 1
        if self.transcript is not None:
            row = {
                "messages": messages,
                "answer": reply,
                "adapters": {a.name: a.scale for a in self.active},
                "tokens": tokens,
                "finish": finish,
                "seconds": round(time.perf_counter() - start, 3),
            }
            with open(self.transcript, "a") as f:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")

    def fit(self) -> tuple[list[dict], list[int]] | None:
        """(messages, prompt ids) that leave room for an answer; the oldest turns go first.

        Room kept for the answer: max_tokens, at most half the context (a long max_tokens must
        not leave no history at all). None (and the message is dropped) when even the latest
        message alone does not fit.
        """
        context = self.backend.context_length
        room = min(self.settings.max_tokens, context // 2)
        dropped = 0
        while True:
            messages = self.messages()
            try:
                ids = self.backend.render_chat(messages)
            except UserError as e:
                self.history.pop()
                self.say(f"error: {e}")
                return None
            if len(ids) + room <= context or len(self.history) <= 1:
                break
            # Drop the oldest exchange: a user turn and the answer to it.
            del self.history[: 2 if len(self.history) > 2 and self.history[1]["role"] == "assistant" else 1]
            dropped += 1
        if len(ids) + room > context:
            self.history.pop()
            self.say(
                f"that message is {len(ids)} tokens with the chat template; with {room} kept for the answer it does not "
                f"fit the context of {context} tokens (serve.context_length); send a shorter one"
            )
            return None
        if dropped:
            turns = "turn" if dropped == 1 else "turns"
            self.say(f"context full ({context} tokens): dropped the {dropped} oldest {turns} of the conversation")
        return messages, ids

    def messages(self) -> list[dict]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return [*system, *self.history]


def describe(active: tuple[AdapterScale, ...]) -> str:
    if not active:
        return "base"
    return " + ".join(f"{a.name} x{a.scale:g}" for a in active)


def parse_adapter_args(args: list[str], loaded: list[str]) -> tuple[AdapterScale, ...]:
    """``a 0.5 b 0.5`` (a scale after a name is optional, 1 by default) -> the set; names must be loaded."""
    chosen: list[AdapterScale] = []
    i = 0
    while i < len(args):
        name, scale = args[i], 1.0
        if i + 1 < len(args) and _is_number(args[i + 1]):
            scale, i = float(args[i + 1]), i + 1
        i += 1
        if _is_number(name):
            raise UserError(f"/adapter: {name} is a scale with no adapter name before it; e.g. /adapter a 0.5 b 0.5")
        if name not in loaded:
            hint = f"loaded: {', '.join(loaded)}" if loaded else "none are loaded (start with eval.run_dir or serve.adapters)"
            raise UserError(f"/adapter: no adapter named {name!r}; {hint}")
        if any(a.name == name for a in chosen):
            raise UserError(f"/adapter: {name} is named twice; give each adapter once with its scale")
        chosen.append(AdapterScale(name, scale))
    return tuple(chosen)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def chat(
    backend: Backend,
    settings: ChatSettings,
    *,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    interactive: bool | None = None,
    transcript: Path | None = None,
) -> dict:
    """Run the chat until /exit, EOF or Ctrl-C at the prompt; returns what happened.

    Args:
        backend: any ``engine.serve.backend.Backend`` (adapters already loaded).
        settings: sampling, answer length, system message and the active set at start.
        stdin: where lines come from (default ``sys.stdin``): each line a message or a command.
        stdout: where answers stream to (default ``sys.stdout``).
        interactive: show a prompt (default: whether ``stdin`` is a terminal).
        transcript: a JSONL file to append each answered turn to.
    """
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    if interactive is None:
        interactive = stdin.isatty()
    session = Session(backend, settings, stdout, transcript=transcript)
    ended_by = "eof"
    try:
        session.banner()
        while True:
            line = _read(stdin, stdout, interactive)
            if line is None:
                break
            if not session.handle(line):
                ended_by = "exit"
                break
    except KeyboardInterrupt:
        ended_by = "ctrl-c"
        stdout.write("\n")
    session.say("bye")
    return {"turns": session.turns, "ended_by": ended_by, "active": {a.name: a.scale for a in session.active}}


def terminal_chat(spec: ServeSpec, source: BackendSource, *, transcript: Path) -> dict:
    """Open the preset's backend and chat over it with the ``serve.chat`` settings; close it after.

    The set active at start is ``serve.chat.adapters`` if given, else the evaluated run's
    adapter (if any). Returns the chat stage's metrics.
    """
    options = spec.chat
    opened = open_backend(spec, source)
    backend = opened.backend
    try:
        start = opened.active
        if options.adapters:
            args = [str(x) for name, scale in options.adapters.items() for x in (name, scale)]
            try:
                start = parse_adapter_args(args, [a.name for a in backend.adapters()])
            except UserError as e:
                raise UserError(f"serve.chat.adapters: {str(e).removeprefix('/adapter: ')}") from None
        settings = ChatSettings(
            max_tokens=options.max_tokens or spec.default_max_tokens,
            temperature=options.temperature,
            top_p=options.top_p,
            seed=options.seed,
            system=options.system,
            adapters=start,
        )
        result = chat(backend, settings, transcript=transcript)
    finally:
        backend.close()
    return {"backend": spec.kind, "model": backend.model_id, **result}


def _read(stdin: TextIO, stdout: TextIO, interactive: bool) -> str | None:
    """The next line, without its newline; None at EOF."""
    if interactive and stdin is sys.stdin and stdout is sys.stdout:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        try:
            return input(PROMPT)
        except EOFError:
            stdout.write("\n")
            return None
    if interactive:
        stdout.write(PROMPT)
        stdout.flush()
    line = stdin.readline()
    return None if line == "" else line.rstrip("\r\n")
