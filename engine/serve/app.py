"""The HTTP layer: OpenAI's routes, adapter hot-swap, API key, one generation at a time.

Routes: ``POST /v1/chat/completions`` and ``POST /v1/completions`` (stream or not), ``GET
/v1/models``, ``GET /health`` (no key), ``GET``/``POST /lora-adapters``. Any backend that
implements ``engine.serve.backend.Backend`` sits behind them.

Why one worker thread and a gate: a model computes one response at a time (a second one
would fight the first for the same cores and the same KV cache, and PEFT's active adapter is
model state). Requests queue on an asyncio lock in arrival order; beyond ``serve.queue``
waiting ones a client gets 429 with Retry-After at once instead of a timeout later. The
backend's token iterator runs in the worker thread, so the event loop keeps answering
/health, /v1/models and adapter switches while a response streams. A client that goes away
stops its generation at the next token and frees the slot.

Why the adapter set is taken when a request arrives: a switch (``POST /lora-adapters``)
changes what the *next* request gets; the running response keeps the set it started with,
so no response mixes two adapter sets.

Every error is OpenAI's shape (``engine.serve.openai.ApiError``): FastAPI's and Starlette's
own handlers (422 validation bodies, HTML 500s) are replaced, an unexpected exception is a
generic 500 logged by type, and the server keeps serving.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from engine.errors import UserError
from engine.serve.adapters import AdapterDirs, AdapterPathError
from engine.serve.backend import AdapterInfo, AdapterScale, Backend, GenerateRequest, Piece, PromptTooLong
from engine.serve.openai import ApiError, ChatRequest, CompletionRequest, parse_adapter_set, parse_body, scrub, validate
from engine.serve.ui import ui_router

log = logging.getLogger("engine.serve")
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


class Server:
    """The state behind the routes: backend, gate, worker thread, active adapter set."""

    def __init__(self, backend: Backend, spec, *, api_key: str | None, adapter_dirs: AdapterDirs):
        self.backend, self.spec, self.dirs = backend, spec, adapter_dirs
        self.api_key = api_key.encode() if api_key else None
        self.gate = Gate(spec.queue)
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine-serve")
        self.active: tuple[AdapterScale, ...] = ()
        """The adapter set requests to the base model's id get; set by POST /lora-adapters."""
        self.started = int(time.time())
        self.served = 0
        """Generations run to their end (or to the client leaving)."""

    # --- auth, bodies -----------------------------------------------------------------

    def check_key(self, request: Request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if not header:
            raise ApiError(
                401,
                "You didn't provide an API key. Send it in an Authorization header: 'Authorization: Bearer <key>'.",
                code="missing_api_key",
            )
        # Constant time: the comparison's duration says nothing about how much of the key matched.
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.api_key):
            raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key")

    async def body(self, request: Request):
        limit = self.spec.max_body_bytes
        too_large = ApiError(
            413, f"The request body is larger than this server accepts ({limit} bytes).", code="request_too_large"
        )
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise too_large
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > limit:
                raise too_large
        return parse_body(bytes(data))

    # --- models and adapters ----------------------------------------------------------

    def adapter_infos(self) -> list[AdapterInfo]:
        return self.backend.adapters()

    def adapters_for(self, model: str) -> tuple[AdapterScale, ...]:
        """The request's set: the base's id gets the active set, an adapter's name that adapter alone."""
        if model == self.backend.model_id:
            return self.active
        if any(a.name == model for a in self.adapter_infos()):
            return (AdapterScale(model, 1.0),)
        shown = model if len(model) <= 80 else model[:80] + "..."
        raise ApiError(
            404,
            f"The model '{shown}' does not exist on this server; GET /v1/models lists the base and its adapters.",
            param="model",
            code="model_not_found",
        )

    def models(self) -> dict:
        base = {
            "id": self.backend.model_id,
            "object": "model",
            "created": self.started,
            "owned_by": "engine",
            "kind": "base",
            "context_length": self.backend.context_length,
            "active_adapters": [{"name": a.name, "scale": a.scale} for a in self.active],
        }
        adapters = [
            {"id": a.name, "object": "model", "created": self.started, "owned_by": "engine", "kind": "adapter"}
            | {"parent": self.backend.model_id, "format": a.format, "run": a.run, "recipe": a.recipe}
            for a in self.adapter_infos()
        ]
        return {"object": "list", "data": [base, *adapters]}

    def lora_list(self) -> list[dict]:
        scales = {a.name: a.scale for a in self.active}
        return [
            {"id": i, "name": a.name, "format": a.format, "run": a.run, "recipe": a.recipe}
            | {"scale": scales.get(a.name, 0.0), "active": a.name in scales}
            for i, a in enumerate(self.adapter_infos())
        ]

    async def set_adapters(self, raw) -> list[dict]:
        """Apply, switch, blend or clear (``[]``); adapters named by path load first."""
        items = parse_adapter_set(raw)
        loaded = self.adapter_infos()
        names = {a.name for a in loaded}
        chosen: list[AdapterScale] = []
        to_load: dict[str, object] = {}
        for i, item in enumerate(items):
            if item.path is not None:
                try:
                    found = self.dirs.resolve(item.path)
                except AdapterPathError as e:
                    raise ApiError(e.status, str(e), param=f"adapters[{i}].path", code=e.code) from None
                name = item.name or found.name
                if name not in names:
                    to_load[name] = found
            elif item.name is not None:
                name = item.name
                if name not in names:
                    message = f"No adapter named '{name[:80]}' is loaded; GET /lora-adapters lists them."
                    raise ApiError(404, message, param=f"adapters[{i}].name", code="adapter_not_found")
            else:
                if not 0 <= item.id < len(loaded):
                    message = f"No adapter with id {item.id}; GET /lora-adapters lists {len(loaded)}."
                    raise ApiError(404, message, param=f"adapters[{i}].id", code="adapter_not_found")
                name = loaded[item.id].name
            if any(c.name == name for c in chosen):
                raise ApiError(
                    400, f"Adapter '{name[:80]}' is listed twice; give each adapter once, with its scale.", param=f"adapters[{i}]"
                )
            chosen.append(AdapterScale(name, item.scale))
        if to_load:

            def load() -> None:
                for name, found in to_load.items():
                    self.backend.load_adapter(name, found.path, run=found.run, recipe=found.recipe)

            try:
                await self.exclusive(load)
            except UserError as e:
                raise ApiError(400, str(e), param="adapters", code="invalid_adapter") from None
        self.active = tuple(chosen)  # from the next request on; running ones keep theirs
        log.info("adapters: %s", ", ".join(f"{a.name}={a.scale:g}" for a in self.active) or "none (base)")
        return self.lora_list()

    async def exclusive(self, fn):
        """Run ``fn`` in the worker while no generation runs (loading an adapter changes the model)."""
        self.gate.enter()
        try:
            async with self.gate.lock:
                return await asyncio.get_running_loop().run_in_executor(self.worker, fn)
        finally:
            self.gate.leave()

    # --- generation -------------------------------------------------------------------

    def limits(self, body, param: str) -> int:
        """Checks before the queue, in O(body): the most prompt tokens this request may have."""
        ctx, wanted = self.backend.context_length, body.wanted_tokens()
        if isinstance(body, ChatRequest) and len(body.messages) > ctx:
            raise ApiError(
                400,
                f"This model's maximum context length is {ctx} tokens, and each of your {len(body.messages)} messages "
                f"takes at least one. Please send fewer messages (at most {ctx}).",
                param=param,
                code="context_length_exceeded",
            )
        return ctx - (wanted or 1)

    def too_long(self, n: int, wanted: int | None, param: str, *, at_least: bool = False) -> ApiError:
        ctx, least = self.backend.context_length, "at least " if at_least else ""
        return ApiError(
            400,
            f"This model's maximum context length is {ctx} tokens. However, you requested {least}{n + (wanted or 0)} "
            f"tokens ({least}{n} in the {param}, {wanted or 0} in the completion). "
            f"Please reduce the length of the {param} or completion.",
            param=param,
            code="context_length_exceeded",
        )

    def budget(self, prompt_ids: list[int], wanted: int | None, param: str) -> int:
        n, ctx = len(prompt_ids), self.backend.context_length
        if not prompt_ids:
            raise ApiError(400, f"The {param} is empty: send at least one token of text.", param=param, code="invalid_value")
        if n >= ctx or (wanted is not None and n + wanted > ctx):
            raise self.too_long(n, wanted, param)
        return wanted if wanted is not None else min(self.spec.default_max_tokens, ctx - n)

    async def start(self, body, render, param: str) -> tuple[Job, Piece | None, int]:
        """Queue for the model; in the gate, render the prompt and start the generation; wait
        for its first piece (so an error before the first token is still a proper status code).

        Why render in the gate: a chat template and a tokenizer cost time linear (llama.cpp's
        special-token parsing: quadratic) in the body, and a body of 20,000 tiny messages cost
        ~29 s of CPU. Rendered in the worker, one request at a time, that work waits in the
        same bounded queue as generation; ``render(limit)`` also refuses a text that cannot
        fit ``limit`` tokens before tokenizing it (``PromptTooLong``).
        """
        adapters = self.adapters_for(body.model)  # the set is taken on arrival (module doc)
        limit = self.limits(body, param)
        self.gate.enter()
        try:
            await self.gate.lock.acquire()
        except BaseException:
            self.gate.leave()
            raise

        def release() -> None:
            self.served += 1
            self.gate.lock.release()
            self.gate.leave()

        loop = asyncio.get_running_loop()
        try:
            prompt_ids = await loop.run_in_executor(self.worker, render, limit)
            greq = GenerateRequest(
                prompt_ids=prompt_ids,
                max_tokens=self.budget(prompt_ids, body.wanted_tokens(), param),
                temperature=body.temperature,
                top_p=body.top_p,
                seed=body.seed,
                stop=body.stops(),
                adapters=adapters,
            )
        except BaseException as e:
            self.gate.lock.release()
            self.gate.leave()
            if isinstance(e, PromptTooLong):
                raise self.too_long(e.floor, body.wanted_tokens(), param, at_least=True) from None
            if isinstance(e, UserError):
                raise ApiError(400, str(e), param=param, code="invalid_value") from None
            raise
        job = Job(self.backend, greq, loop, release)
        loop.run_in_executor(self.worker, job.run)
        try:
            first = await job.next()
        except UserError as e:  # the backend refused the request before its first token
            job.cancel()
            raise ApiError(400, str(e), param=param, code="invalid_value") from None
        except BaseException:
            job.cancel()
            raise
        return job, first, len(prompt_ids)


def build_app(
    backend: Backend,
    spec,
    *,
    api_key: str | None = None,
    adapter_dirs: AdapterDirs | None = None,
    outputs_dir: str | Path | None = None,
) -> FastAPI:
    """The FastAPI app over one backend.

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
    keyed = [Depends(server.check_key)]

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        if e.status_code == 404:
            err = ApiError(404, f"Unknown request URL: {request.method} {request.url.path}.", code="unknown_url")
        elif e.status_code == 405:
            err = ApiError(405, f"Method {request.method} is not allowed on {request.url.path}.", code="method_not_allowed")
        else:
            err = ApiError(e.status_code, str(e.detail))
        return JSONResponse(err.body(), status_code=err.status, headers=dict(e.headers or {}))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        first = (e.errors() or [{}])[0]
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        err = ApiError(400, f"Invalid request: {first.get('msg', 'bad value')}.", param=param, code="invalid_value")
        return JSONResponse(err.body(), status_code=400)

    app.add_middleware(_Guard)

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
        return await _respond(body, *started, chat=True)

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
        return await _respond(body, *started, chat=False)

    app.include_router(ui_router(outputs_dir, dependencies=keyed))  # the page; its runs API takes the key
    return app


async def _respond(body, job: Job, first: Piece | None, n_prompt: int, *, chat: bool):
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    created = int(time.time())
    shape = _Shape(rid, created, body.model, chat)
    if not body.stream:
        pieces = [first] if first else []
        try:
            while (piece := await job.next()) is not None:
                pieces.append(piece)
        except UserError as e:
            raise ApiError(400, str(e)) from None
        finally:
            job.cancel()
        text = "".join(p.text for p in pieces)
        finish = next((p.finish_reason for p in reversed(pieces) if p.finish_reason), "stop")
        used = sum(len(p.token_ids) for p in pieces)
        return shape.whole(text, finish, _usage(n_prompt, used))

    async def events() -> AsyncIterator[str]:
        used = 0
        try:
            if chat:
                yield _sse(shape.chunk({"role": "assistant", "content": ""}, None))
            piece = first
            while piece is not None:
                used += len(piece.token_ids)
                if piece.text or piece.finish_reason:
                    if piece.text:
                        yield _sse(shape.chunk({"content": piece.text} if chat else piece.text, None))
                    if piece.finish_reason:
                        yield _sse(shape.chunk({} if chat else "", piece.finish_reason))
                piece = await job.next()
            if body.include_usage():
                yield _sse(shape.usage_chunk(_usage(n_prompt, used)))
            yield "data: [DONE]\n\n"
        except Exception as e:  # headers are sent: the error goes in the stream, as OpenAI does
            err = ApiError(400, str(e)) if isinstance(e, UserError) else _internal(e)
            yield _sse(err.body())
        finally:
            job.cancel()  # a client gone mid-stream: stop at the next token, free the slot

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(events(), media_type="text/event-stream", headers=headers)


class _Shape:
    """OpenAI's response objects for one request (chat.completion / text_completion and their chunks)."""

    def __init__(self, rid: str, created: int, model: str, chat: bool):
        self.rid, self.created, self.model, self.chat = rid, created, model, chat

    def _head(self, obj: str) -> dict:
        return {"id": self.rid, "object": obj, "created": self.created, "model": self.model, "system_fingerprint": None}

    def whole(self, text: str, finish: str, usage: dict) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": finish}
            return self._head("chat.completion") | {"choices": [choice], "usage": usage}
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        return self._head("text_completion") | {"choices": [choice], "usage": usage}

    def chunk(self, delta, finish: str | None) -> dict:
        if self.chat:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return self._head("chat.completion.chunk") | {"choices": [choice]}
        choice = {"index": 0, "text": delta, "logprobs": None, "finish_reason": finish}
        return self._head("text_completion") | {"choices": [choice]}

    def usage_chunk(self, usage: dict) -> dict:
        return self._head("chat.completion.chunk" if self.chat else "text_completion") | {"choices": [], "usage": usage}


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _internal(e: BaseException) -> ApiError:
    # Logged by type and a scrubbed message: no traceback (it names files) and no local paths.
    log.error("internal error: %s: %s", type(e).__name__, scrub(str(e))[:500])
    return ApiError(500, "The server had an error while processing your request.", type="server_error", code="internal_error")


class _Guard:
    """Any exception a route did not turn into an ApiError: a generic 500 in OpenAI's shape;
    a client that went away is logged at INFO (it is no server error).

    Pure ASGI, inside Starlette's ServerErrorMiddleware: that one would answer with plain text
    and re-raise into uvicorn's traceback log.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracked(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except ClientDisconnect:  # the client went away (mid-body or mid-response): nobody to answer
            log.info("client went away: %s %s", scope.get("method"), scope.get("path"))
        except Exception as e:
            err = _internal(e)
            if not started:
                await JSONResponse(err.body(), status_code=500)(scope, receive, send)
