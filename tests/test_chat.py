"""The terminal chat: history, streaming, commands, context overflow, clean exits; the recipe in a pipe.

The loop runs on a real hf backend (a tiny random-init Llama and two random LoRA adapters with
non-zero B, so each adapter set visibly changes the greedy answer), fed lines through its stream
arguments. ``Recorded`` passes every call through to that backend and keeps the requests, so a
test checks what the model was asked (the whole history, the adapter set) against what the chat
printed. The recipe itself runs as a user runs it: a subprocess with stdin piped, and one
stopped with Ctrl-C (SIGINT) at the prompt.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, compose, save_adapter

from engine.errors import UserError
from engine.serve.backend import AdapterScale, GenerateRequest


def tiny_backend(adapters: dict[str, Path], context_length: int = 256):
    from engine.model import TinySpec
    from engine.serve.backends.hf import HfSpec, load_hf

    spec = HfSpec(kind="hf", device="cpu", context_length=context_length)
    return load_hf(spec, model_spec=TinySpec(kind="tiny"), adapter_paths=adapters)


class Recorded:
    """The real backend, every call passed through; ``requests`` keeps what generate was asked."""

    def __init__(self, backend, interrupt_after: int | None = None):
        self.inner = backend
        self.requests: list[GenerateRequest] = []
        self.interrupt_after = interrupt_after
        """Raise KeyboardInterrupt (what Ctrl-C raises) after this many pieces of the next answer."""

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def generate(self, request):
        self.requests.append(request)
        for i, piece in enumerate(self.inner.generate(request)):
            if self.interrupt_after is not None and i == self.interrupt_after:
                self.interrupt_after = None
                raise KeyboardInterrupt
            yield piece


class Writes(io.StringIO):
    """An output stream that remembers each write (streaming = an answer in many writes)."""

    def __init__(self):
        super().__init__()
        self.writes: list[str] = []

    def write(self, s: str) -> int:
        self.writes.append(s)
        return super().write(s)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("chat")
    return {"a": save_adapter(root / "a", seed=1), "b": save_adapter(root / "b", seed=2)}


@pytest.fixture(scope="module")
def backend(adapters):
    b = tiny_backend(adapters)
    yield b
    b.close()


def greedy(backend, messages: list[dict], adapters: tuple[AdapterScale, ...] = (), max_tokens: int = 8) -> str:
    ids = backend.render_chat(messages)
    return "".join(p.text for p in backend.generate(GenerateRequest(ids, max_tokens, temperature=0, adapters=adapters)))


def run_chat(backend, lines: list[str], max_tokens: int = 8, **kw):
    from engine.serve.chat import ChatSettings, chat

    out = Writes()
    settings = ChatSettings(max_tokens=max_tokens, temperature=0, **kw)
    result = chat(backend, settings, stdin=io.StringIO("".join(f"{x}\n" for x in lines)), stdout=out, interactive=False)
    return result, out


def test_history_streaming_adapters_system_reset_and_exit(backend, tmp_path):
    rec = Recorded(backend)
    u = "Why do rivers meander?"
    a = (AdapterScale("a", 1.0),)
    lines = [u, "And then?", "/adapter a 0.5 b 0.5", u, "/adapter none", u, "/reset", "/system Be brief.", u]
    result, out = run_chat(rec, [*lines, "/bogus", "/exit", "never read"], adapters=a)
    text = out.getvalue()

    # Answers stream: the first one arrives in several writes, and is the backend's greedy answer.
    first = greedy(backend, [{"role": "user", "content": u}], a)
    assert first.strip() and first in text
    pieces = [w for w in out.writes if w.strip() and w in first]
    assert len(pieces) >= 2, "the answer was not streamed piece by piece"

    # History: the second turn sends the first exchange along.
    r = rec.requests
    assert len(r) == 5
    history = [{"role": "user", "content": u}, {"role": "assistant", "content": first.strip()}]
    assert r[1].prompt_ids == backend.render_chat([*history, {"role": "user", "content": "And then?"}])
    # /adapter sets what the next answers use; the conversation goes on under it.
    assert r[0].adapters == r[1].adapters == a
    assert r[2].adapters == (AdapterScale("a", 0.5), AdapterScale("b", 0.5))
    assert r[3].adapters == ()
    assert "[chat] active: a x0.5 + b x0.5" in text and "[chat] active: the base model alone" in text
    assert greedy(backend, [{"role": "user", "content": u}]) != first  # the adapter matters
    # /reset, /system: the last turn is a fresh conversation under the system message.
    assert r[4].adapters == ()
    assert r[4].prompt_ids == backend.render_chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": u}])
    # An unknown command is one hint line; /exit stops reading (the line after it never becomes a turn).
    hints = [x for x in text.splitlines() if "/bogus" in x]
    assert hints == ["[chat] unknown command /bogus; /help lists the commands (/reset, /adapter, /system, /exit)"]
    assert result == {"turns": 5, "ended_by": "exit", "active": {}}


def test_adapter_command_refuses_unknown_names_and_shows_the_set(backend):
    from engine.serve.chat import parse_adapter_args

    assert parse_adapter_args(["a", "b", "0.25"], ["a", "b"]) == (AdapterScale("a", 1.0), AdapterScale("b", 0.25))
    with pytest.raises(UserError, match="no adapter named 'c'; loaded: a, b"):
        parse_adapter_args(["c", "1"], ["a", "b"])
    with pytest.raises(UserError, match="named twice"):
        parse_adapter_args(["a", "1", "a", "2"], ["a", "b"])
    with pytest.raises(UserError, match="scale with no adapter name"):
        parse_adapter_args(["0.5", "a"], ["a", "b"])
    rec = Recorded(backend)
    result, out = run_chat(rec, ["/adapter c 1", "/adapter", "/help"])
    text = out.getvalue()
    assert "[chat] /adapter: no adapter named 'c'; loaded: a, b" in text
    assert "[chat] loaded: a, b; active: base" in text
    assert "/adapter none" in text and "/system TEXT" in text  # the help
    assert rec.requests == [] and result["ended_by"] == "eof"


def test_context_overflow_drops_the_oldest_turns_and_says_so(adapters):
    small = tiny_backend(adapters, context_length=96)
    try:
        rec = Recorded(small)
        long = " ".join(["rivers"] * 18)
        result, out = run_chat(rec, [f"{long} {i}" for i in range(4)] + [" ".join(["x"] * 200), "still here?"], max_tokens=8)
    finally:
        small.close()
    text = out.getvalue()
    assert "[chat] context full (96 tokens): dropped the" in text
    for r in rec.requests:  # every prompt left room for the answer
        assert len(r.prompt_ids) + 8 <= 96
    # The latest message is always sent; the too-long one is refused and the chat goes on.
    assert "does not fit the context of 96 tokens" in text
    assert len(rec.requests) == 5 and result["turns"] == 5
    assert rec.requests[-1].prompt_ids[-40:] == small.render_chat([{"role": "user", "content": "still here?"}])[-40:]


def test_eof_ctrl_c_at_the_prompt_and_mid_answer_end_cleanly(backend):
    from engine.serve.chat import ChatSettings, chat

    class CtrlC(io.StringIO):
        def readline(self, *a):
            raise KeyboardInterrupt

    out = io.StringIO()
    result = chat(backend, ChatSettings(max_tokens=4), stdin=CtrlC(), stdout=out, interactive=True)
    assert result["ended_by"] == "ctrl-c" and out.getvalue().rstrip().endswith("[chat] bye")

    rec = Recorded(backend, interrupt_after=2)
    result, out = run_chat(rec, ["first", "second"], max_tokens=8)
    assert "[chat] answer stopped" in out.getvalue()
    assert len(rec.requests) == 2 and result == {"turns": 2, "ended_by": "eof", "active": {}}


# --- the recipe, as a user runs it ------------------------------------------------------------


def fake_run(root: Path) -> Path:
    """A finished lora run dir of the tiny model: its config.yaml and a (random) PEFT adapter/."""
    import yaml

    raw = compose(["recipe=lora_smollm2", "model=tiny"], check=False)
    run = root / "lora_smollm2" / "run1"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(raw))
    save_adapter(run / "adapter", seed=1)
    return run


def engine_cmd(tmp_path: Path, run: Path, *extra: str) -> list[str]:
    args = ["recipe=chat", "serve=hf", "device=cpu", f"eval.run_dir={run}", "serve.chat.temperature=0", "serve.chat.max_tokens=6"]
    return [sys.executable, "-m", "engine", *args, *extra, f"hydra.run.dir={tmp_path / 'chat'}"]


ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}


def test_chat_recipe_reads_turns_from_a_pipe(tmp_path):
    """Piped stdin: each line a turn; the run's adapter is active at start; EOF ends with exit 0."""
    run = fake_run(tmp_path / "outputs")
    lines = "Why do rivers meander?\n/adapter\n/adapter none\nWhy do rivers meander?\n"
    proc = subprocess.run(engine_cmd(tmp_path, run), input=lines, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "[chat] tiny (adapters loaded: run1; active: run1 x1)" in proc.stdout
    assert "[chat] loaded: run1; active: run1 x1" in proc.stdout
    turns = [json.loads(x) for x in (tmp_path / "chat" / "chat.jsonl").read_text().splitlines()]
    assert [t["adapters"] for t in turns] == [{"run1": 1.0}, {}]
    assert turns[0]["messages"] == [{"role": "user", "content": "Why do rivers meander?"}]
    assert turns[0]["answer"] != turns[1]["answer"]  # the run's adapter vs the base
    assert all(t["tokens"] >= 1 and t["answer"] in proc.stdout for t in turns)
    metrics = json.loads((tmp_path / "chat" / "metrics.json").read_text())["chat"]
    assert metrics["turns"] == 2 and metrics["ended_by"] == "eof" and metrics["backend"] == "hf"


def test_chat_recipe_ends_cleanly_on_ctrl_c(tmp_path):
    run = fake_run(tmp_path / "outputs")
    proc = subprocess.Popen(
        engine_cmd(tmp_path, run),
        cwd=ROOT,
        env=ENV,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # A shell runs background jobs with SIGINT ignored, and Python then installs no Ctrl-C
        # handler: give the child the default disposition, as a terminal would.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        for line in proc.stdout:
            if line.startswith("[chat] tiny"):
                break
        proc.send_signal(signal.SIGINT)
        # Wait with stdin still open (communicate() would close it: an EOF would end the chat too).
        proc.wait(timeout=60)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert "Traceback" not in err and "[chat] bye" in out
    assert json.loads((tmp_path / "chat" / "metrics.json").read_text())["chat"]["ended_by"] == "ctrl-c"
