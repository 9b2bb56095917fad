"""chat: a conversation in the terminal with the served model (recipe chat), until /exit or EOF.

``engine.serve.chat.terminal_chat`` opens the ``serve`` preset's backend as the serve stage does
(the base, a run's adapter with ``eval.run_dir``, a GGUF with ``serve=llamacpp``) and chats over
it with the ``serve.chat`` settings. Stdin may be a pipe: each line is a turn. Every answered
turn is appended to ``chat.jsonl`` in the run dir.
"""

from __future__ import annotations

from engine.context import RunContext
from engine.serve.chat import terminal_chat
from engine.stages.registry import STAGES


@STAGES.register("chat")
def chat(ctx: RunContext) -> dict:
    """Interactive chat with history and streaming; /adapter switches or blends adapters."""
    return terminal_chat(ctx.cfg.serve, ctx.backend_source(), transcript=ctx.run_dir / "chat.jsonl")
