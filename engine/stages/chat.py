"""chat: a conversation in the terminal with the served model (recipe chat), until /exit or EOF.

Builds the ``serve`` preset's backend as the serve stage does (``open_backend``: the base, a
run's adapter with ``eval.run_dir``, a GGUF with ``serve=llamacpp``) and hands it to
engine/serve/chat.py with the ``serve.chat`` settings. Stdin may be a pipe: each line is a turn.
Every answered turn is appended to ``chat.jsonl`` in the run dir.
"""

from __future__ import annotations

from engine.stages.registry import STAGES


@STAGES.register("chat")
def chat(ctx) -> dict:
    """Interactive chat with history and streaming; /adapter switches or blends adapters."""
    from engine.errors import UserError
    from engine.serve.backend import AdapterScale
    from engine.serve.chat import ChatSettings, parse_adapter_args
    from engine.serve.chat import chat as run_chat
    from engine.stages.serve import open_backend

    spec = ctx.cfg.serve
    opened = open_backend(ctx)
    backend = opened.backend
    try:
        if spec.chat.adapters:
            args = [str(x) for name, scale in spec.chat.adapters.items() for x in (name, scale)]
            try:
                start = parse_adapter_args(args, [a.name for a in backend.adapters()])
            except UserError as e:
                raise UserError(f"serve.chat.adapters: {str(e).removeprefix('/adapter: ')}") from None
        else:
            start = tuple(AdapterScale(name, scale) for name, scale in opened.active)
        settings = ChatSettings(
            max_tokens=spec.chat.max_tokens or spec.default_max_tokens,
            temperature=spec.chat.temperature,
            top_p=spec.chat.top_p,
            seed=spec.chat.seed,
            system=spec.chat.system,
            adapters=start,
        )
        result = run_chat(backend, settings, transcript=ctx.run_dir / "chat.jsonl")
    finally:
        backend.close()
    return {"backend": spec.kind, "model": backend.model_id, **result}
