"""serve: an OpenAI-compatible HTTP server over the run's model, until SIGTERM / Ctrl-C.

Builds the ``serve`` preset's backend (engine/serve/backends/) and runs the app
(engine/serve/app.py) under uvicorn, printing ``Serving on http://HOST:PORT (playground at .../, OpenAI API at .../v1)``.
With ``eval.run_dir`` the finished run's trained weights are served: its adapter is loaded and
active for requests to the base model's id (hf: the PEFT adapter/, every level of a layered
run with its scales; llamacpp: export/adapter-lora.gguf on the GGUF it was exported for,
written here first if the run never exported one). The run dir is then an adapter directory
too, so more of its files load through POST /lora-adapters. ``open_backend`` is that construction
alone: the chat and adapter_matrix stages build the same backend with it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.stages.registry import STAGES


@dataclass
class Opened:
    """The serve preset's backend, built from the run: what the serve, chat and adapter_matrix stages share."""

    backend: Any
    """An ``engine.serve.backend.Backend`` with every configured adapter loaded."""
    active: list[tuple[str, float]]
    """The set active at start: the run's adapter (its levels, with their scales) with eval.run_dir, else none."""
    fence: Any
    """``AdapterDirs``: serve.adapter_dirs plus the evaluated run's dir."""
    loaded: list[str]
    """Names of the adapters loaded at start, in load order."""


def open_backend(ctx) -> Opened:
    """Build the ``serve`` preset's backend with serve.adapters and the run of eval.run_dir loaded."""
    from engine.errors import ConfigError
    from engine.serve import SERVERS
    from engine.serve import backends as _  # noqa: F401  (registers the kinds)
    from engine.serve.adapters import AdapterDirs, AdapterPathError

    cfg, spec = ctx.cfg, ctx.cfg.serve
    evaluated = cfg.evaluated_run
    fence = AdapterDirs([*spec.adapter_dirs, *([evaluated.path] if evaluated else [])])
    adapters: dict[str, Path] = {}
    info: dict[str, dict] = {}
    for name, given in spec.adapters.items():
        try:
            found = fence.resolve(given)
        except AdapterPathError as e:
            raise ConfigError(f"serve.adapters.{name}: {e}") from None
        adapters[name], info[name] = found.path, {"run": found.run, "recipe": found.recipe}
    runtime: dict = {"model_spec": cfg.model}
    active: list[tuple[str, float]] = []
    if evaluated is not None:
        run_adapters, active, gguf = _run_weights(ctx, spec.kind)
        for name, path in run_adapters.items():
            adapters[name], info[name] = path, {"run": evaluated.path.name, "recipe": _recipe_of(evaluated.path)}
        if gguf is not None:
            runtime["gguf_path"] = gguf
    if spec.kind == "hf":
        runtime["quant_spec"] = cfg.quantization
    backend = SERVERS.build(spec, **runtime, adapter_paths=adapters, run_info=info)
    return Opened(backend, active, fence, list(adapters))


@STAGES.register("serve")
def serve(ctx) -> dict:
    """The model behind OpenAI's API (chat, completions, models, adapter hot-swap) until stopped."""
    from engine.serve.app import build_app
    from engine.serve.backend import AdapterScale
    from engine.serve.server import run
    from engine.settings import settings

    spec = ctx.cfg.serve
    opened = open_backend(ctx)
    backend, active = opened.backend, opened.active
    key = settings().engine_api_key.get_secret_value() if spec.api_key else None
    app = build_app(backend, spec, api_key=key, adapter_dirs=opened.fence, outputs_dir=spec.runs_dir)
    server = app.state.server
    server.active = tuple(AdapterScale(name, scale) for name, scale in active)
    try:
        url, stopped_by = run(app, spec.host, spec.port, announce=_announce)
    finally:
        server.worker.shutdown(wait=True, cancel_futures=True)
        backend.close()
    print(f"[engine] serve: stopped ({stopped_by or 'shutdown'}); {server.served} requests answered", flush=True)
    return {
        "url": url,
        "backend": spec.kind,
        "model": backend.model_id,
        "adapters": opened.loaded,
        "active": dict(active),
        "stopped_by": stopped_by,
        "requests": server.served,
    }


def _recipe_of(run_dir: Path) -> str | None:
    from engine.serve.adapters import provenance

    return provenance(run_dir)[1]


def _run_weights(ctx, kind: str) -> tuple[dict[str, Path], list[tuple[str, float]], Path | None]:
    """(adapters to load, the active set, a base GGUF) for the finished run of ``eval.run_dir``."""
    from engine.export.merge import find_trained

    run = ctx.cfg.evaluated_run.path
    name = run.name
    trained = find_trained(run, scales=getattr(ctx.cfg.adapter, "scales", None) or None)
    if kind == "hf":
        if trained.adapter_dir is None:  # a full fine-tune: its model/ is the base (cfg.model points there)
            return {}, [], None
        if trained.levels:
            paths = {f"{name}/level_{k}": trained.adapter_dir / f"level_{k}" for k in trained.levels}
            return paths, list(zip(paths, trained.scales, strict=True)), None
        return {name: trained.adapter_dir}, [(name, 1.0)], None
    # llamacpp: GGUF files from the run's export (or written now).
    export = run / "export"
    manifest = json.loads((export / "manifest.json").read_text()) if (export / "manifest.json").is_file() else {"files": {}}
    files = manifest.get("files", {})
    if trained.adapter_dir is None:
        models = [export / n for n, e in files.items() if e.get("kind") == "model"]
        if not models:
            from engine.errors import UserError

            raise UserError(
                f"serve: run {name} is a full fine-tune with no GGUF export; export it first "
                f"(python -m engine recipe=export_smollm2 eval.run_dir={run} 'stages=[merge,export_gguf]') or use serve=hf"
            )
        return {}, [], models[0]
    lora = export / "adapter-lora.gguf"
    if lora.is_file():
        from engine.export.manifest import base_gguf_of

        base = base_gguf_of(files["adapter-lora.gguf"], export) if "adapter-lora.gguf" in files else None
        return {name: lora}, [(name, 1.0)], base
    return {name: _export_lora(ctx, trained)}, [(name, 1.0)], None


def _export_lora(ctx, trained) -> Path:
    """Write the run's LoRA as a GGUF adapter into this run dir (for the packaged GGUF base)."""
    from engine.errors import UserError
    from engine.export.gguf import write_lora_gguf

    model = ctx.cfg.model
    if model.kind != "gguf":
        raise UserError(
            f"serve: run {trained.adapter_dir.parent.name} has no export/adapter-lora.gguf and its base is not a packaged "
            "GGUF; export it first (stages=[merge,export_gguf] with eval.run_dir) or use serve=hf"
        )
    from engine.model import convert_gguf_once

    config = json.loads((convert_gguf_once(model.package, model.file) / "config.json").read_text())
    out = ctx.run_dir / "export"
    out.mkdir(parents=True, exist_ok=True)
    print("[engine] serve: writing the run's LoRA as a GGUF adapter (once) -> export/adapter-lora.gguf", flush=True)
    return write_lora_gguf(trained, config, out / "adapter-lora.gguf")


def _announce(url: str) -> None:
    print(f"Serving on {url} (playground at {url}/, OpenAI API at {url}/v1)", flush=True)
