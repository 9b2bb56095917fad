"""The state behind the routes: the backend, its scheduler, the active adapter set.

Why the adapter set is taken when a request arrives: a switch (``POST /lora-adapters``)
changes what the *next* request gets; a running response keeps the set it started with,
so no response mixes two adapter sets (each sequence of a batch has its own set). Loading
an adapter changes the model, so it runs on the scheduler's thread between two steps
(``exclusive``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor

from fastapi import Request

from engine.errors import UserError
from engine.serve import ServeSpec
from engine.serve.adapters import AdapterDirs, AdapterPathError, Found
from engine.serve.backend import AdapterInfo, AdapterScale, Backend, GenerateRequest, Piece, PromptTooLong
from engine.serve.limits import budget, check_key, prompt_limit, read_body, too_long
from engine.serve.openai import AdapterItem, ApiError, parse_adapter_set
from engine.serve.worker import Gate, Job, Scheduler

log = logging.getLogger("engine.serve")


class Server:
    """One backend served: who may call, what is loaded and active, the batch its requests join."""

    def __init__(self, backend: Backend, spec: ServeSpec, *, api_key: str | None, adapter_dirs: AdapterDirs):
        self.backend, self.spec, self.dirs = backend, spec, adapter_dirs
        self.api_key = api_key.encode() if api_key else None
        self.gate = Gate(spec.max_batch, spec.queue)
        self.scheduler = Scheduler(backend.batch)
        self.renderer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine-render")
        """Chat templates and tokenizers run here, one request at a time, beside the batch's steps."""
        self.active: tuple[AdapterScale, ...] = ()
        """The adapter set requests to the base model's id get; set by POST /lora-adapters."""
        self.started = int(time.time())
        self.served = 0
        """Generations run to their end (or to the client leaving)."""

    def check_key(self, request: Request) -> None:
        check_key(request, self.api_key)

    async def body(self, request: Request):
        return await read_body(request, self.spec.max_body_bytes)

    # --- models and adapters ----------------------------------------------------------

    def adapters_for(self, model: str) -> tuple[AdapterScale, ...]:
        """The request's set: the base's id gets the active set, an adapter's name that adapter alone."""
        if model == self.backend.model_id:
            return self.active
        if any(a.name == model for a in self.backend.adapters()):
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
            for a in self.backend.adapters()
        ]
        return {"object": "list", "data": [base, *adapters]}

    def lora_list(self) -> list[dict]:
        scales = {a.name: a.scale for a in self.active}
        return [
            {"id": i, "name": a.name, "format": a.format, "run": a.run, "recipe": a.recipe}
            | {"scale": scales.get(a.name, 0.0), "active": a.name in scales}
            for i, a in enumerate(self.backend.adapters())
        ]

    async def set_adapters(self, raw) -> list[dict]:
        """Apply, switch, blend or clear (``[]``); adapters named by path load first."""
        chosen, to_load = choose(parse_adapter_set(raw), self.backend.adapters(), self.dirs)
        if to_load:

            def load() -> None:
                for name, found in to_load.items():
                    self.backend.load_adapter(name, found.path, run=found.run, recipe=found.recipe)

            try:
                await self.exclusive(load)
            except UserError as e:
                raise ApiError(400, str(e), param="adapters", code="invalid_adapter") from None
        self.active = chosen  # from the next request on; running ones keep theirs
        log.info("adapters: %s", ", ".join(f"{a.name}={a.scale:g}" for a in self.active) or "none (base)")
        return self.lora_list()

    async def exclusive(self, fn):
        """Run ``fn`` on the scheduler's thread between two steps (loading an adapter changes the model)."""
        self.gate.enter()
        try:
            return await asyncio.wrap_future(self.scheduler.call(fn))
        finally:
            self.gate.leave()

    def close(self) -> None:
        """After the HTTP server stopped: end what still runs, stop the threads."""
        self.scheduler.close()
        self.renderer.shutdown(wait=True, cancel_futures=True)

    # --- generation -------------------------------------------------------------------

    async def start(self, body, render, param: str) -> tuple[Job, Piece | None, int]:
        """Take a place (429 when ``max_batch`` run and ``queue`` wait); render the prompt; join
        the batch; wait for the first piece (so an error before the first token is still a
        proper status code).

        Why render in its own thread, in the gate: a chat template and a tokenizer cost time
        linear (llama.cpp's special-token parsing: quadratic) in the body, and a body of 20,000
        tiny messages cost ~29 s of CPU. Rendered one request at a time in the renderer thread,
        that work waits in the same bounded gate as generation and never stalls a step;
        ``render(limit)`` also refuses a text that cannot fit ``limit`` tokens before
        tokenizing it (``PromptTooLong``).
        """
        adapters = self.adapters_for(body.model)  # the set is taken on arrival (module doc)
        context = self.backend.context_length
        limit = prompt_limit(body, context, param)
        self.gate.enter()
        loop = asyncio.get_running_loop()
        try:
            prompt_ids = await loop.run_in_executor(self.renderer, render, limit)
            wanted = body.wanted_tokens()
            greq = GenerateRequest(
                prompt_ids=prompt_ids,
                max_tokens=budget(prompt_ids, wanted, param, context=context, default=self.spec.default_max_tokens),
                temperature=body.temperature,
                top_p=body.top_p,
                seed=body.seed,
                stop=body.stops(),
                adapters=adapters,
            )
        except BaseException as e:
            self.gate.leave()
            if isinstance(e, PromptTooLong):
                raise too_long(context, e.floor, body.wanted_tokens(), param, at_least=True) from None
            if isinstance(e, UserError):
                raise ApiError(400, str(e), param=param, code="invalid_value") from None
            raise

        def release() -> None:
            self.served += 1
            self.gate.leave()

        job = Job(greq, loop, release)
        self.scheduler.submit(job)
        try:
            first = await job.next()
        except UserError as e:  # the backend refused the request before its first token
            job.cancel()
            raise ApiError(400, str(e), param=param, code="invalid_value") from None
        except BaseException:
            job.cancel()
            raise
        return job, first, len(prompt_ids)


def choose(
    items: list[AdapterItem], loaded: list[AdapterInfo], fence: AdapterDirs
) -> tuple[tuple[AdapterScale, ...], dict[str, Found]]:
    """(the set a POST /lora-adapters body asks for, the adapters it names by path that must load first).

    Each item names a loaded adapter by ``name`` or ``id``, or a file inside the fence by ``path``
    (served under ``name`` if given, else its path in the adapter directory).
    """
    names = {a.name for a in loaded}
    chosen: list[AdapterScale] = []
    to_load: dict[str, Found] = {}
    for i, item in enumerate(items):
        if item.path is not None:
            try:
                found = fence.resolve(item.path)
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
    return tuple(chosen), to_load
