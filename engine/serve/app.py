"""The HTTP layer: OpenAI's routes, adapter hot-swap, API key, continuous batching.

Routes: ``POST /v1/chat/completions`` and ``POST /v1/completions`` (stream or not), ``GET
/v1/models``, ``GET /health`` (no key), ``GET``/``POST /lora-adapters``, and the page
(engine/serve/ui.py). Any backend that implements ``engine.serve.backend.Backend`` sits
behind them. A request goes, top to bottom:

  limits.py  the key, the body size, the prompt's size against the context (before the queue)
  state.py   ``Server``: the adapter set it gets (taken on arrival), the gate, render, start
  worker.py  the gate (429 beyond ``max_batch`` + ``queue``) and the scheduler: one thread
             stepping the backend's batch, requests joining and leaving between steps
  stream.py  the answer: one JSON object, or server-sent events as tokens come
  guard.py   any error, in OpenAI's shape; the server keeps serving
"""

from __future__ import annotations

from pathlib import Path

from fastapi import Depends, FastAPI, Request

from engine.serve import ServeSpec
from engine.serve.adapters import AdapterDirs
from engine.serve.backend import Backend
from engine.serve.guard import guard
from engine.serve.openai import ChatRequest, CompletionRequest, validate
from engine.serve.state import Server
from engine.serve.stream import respond
from engine.serve.ui import ui_router


def build_app(
    backend: Backend,
    spec: ServeSpec,
    *,
    api_key: str | None = None,
    adapter_dirs: AdapterDirs | None = None,
    outputs_dir: str | Path | None = None,
) -> FastAPI:
    """The FastAPI app over one backend; its ``Server`` is ``app.state.server``.

    Args:
        backend: a loaded backend (engine/serve/backends/); the caller closes it after the server stops.
        spec: the serve preset (queue, body limit, default max_tokens).
        api_key: the key every route but /health requires (None: no key).
        adapter_dirs: where POST /lora-adapters may load adapters from (none: by name only).
        outputs_dir: run dirs the playground's runs view lists (engine/serve/ui.py); None: none.
    """
    server = Server(backend, spec, api_key=api_key, adapter_dirs=adapter_dirs or AdapterDirs([]))
    app = FastAPI(title="engine", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server
    guard(app)
    keyed = [Depends(server.check_key)]

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": backend.model_id, "busy": server.gate.inside}

    @app.get("/v1/models", dependencies=keyed)
    async def models():
        return server.models()

    @app.get("/v1/models/{model_id:path}", dependencies=keyed)
    async def model(model_id: str):
        server.adapters_for(model_id)  # 404 in OpenAI's shape when unknown
        return next(m for m in server.models()["data"] if m["id"] == model_id)

    @app.get("/lora-adapters", dependencies=keyed)
    async def lora_adapters():
        return server.lora_list()

    @app.post("/lora-adapters", dependencies=keyed)
    async def set_lora_adapters(request: Request):
        return await server.set_adapters(await server.body(request))

    @app.post("/v1/chat/completions", dependencies=keyed)
    async def chat(request: Request):
        body = validate(ChatRequest, await server.body(request))
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
        started = await server.start(body, lambda limit: backend.render_chat(messages, limit=limit), "messages")
        return await respond(body, *started, chat=True)

    @app.post("/v1/completions", dependencies=keyed)
    async def completions(request: Request):
        body = validate(CompletionRequest, await server.body(request))
        prompt = body.prompt

        def render(limit: int) -> list[int]:
            if isinstance(prompt, str):
                return backend.tokenize(prompt, limit=limit)
            if isinstance(prompt[0], str):
                return backend.tokenize(prompt[0], limit=limit)
            return list(prompt)

        started = await server.start(body, render, "prompt")
        return await respond(body, *started, chat=False)

    app.include_router(ui_router(outputs_dir, dependencies=keyed))  # the page; its runs API takes the key
    return app
