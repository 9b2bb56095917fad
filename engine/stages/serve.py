"""serve: an OpenAI-compatible HTTP server over the run's model, until SIGTERM / Ctrl-C.

``engine.serve.server.serve`` opens the ``serve`` preset's backend (engine/serve/backends/) and
runs the app (engine/serve/app.py) under uvicorn, printing ``Serving on http://HOST:PORT
(playground at .../, OpenAI API at .../v1)``. With ``eval.run_dir`` the finished run's trained
weights are served, active for requests to the base model's id (hf: the PEFT adapter/, every
level of a layered run with its scales; llamacpp: export/adapter-lora.gguf on the GGUF it was
exported for, written here first if the run never exported one), and its dir is an adapter
directory too.
"""

from __future__ import annotations

from engine.context import RunContext
from engine.serve.server import serve as serve_until_stopped
from engine.stages.registry import STAGES


@STAGES.register("serve")
def serve(ctx: RunContext) -> dict:
    """The model behind OpenAI's API (chat, completions, models, adapter hot-swap) until stopped."""
    return serve_until_stopped(ctx.cfg.serve, ctx.backend_source())
