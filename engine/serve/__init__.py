"""The ``serve`` group: an OpenAI-compatible HTTP server over a trained model and its adapters.

Kinds (the preset is the backend; ``serve=hf`` swaps the whole subtree):
  llamacpp  a GGUF base (the packaged SmolLM2 Q4_1 by default, or a run's export) with GGUF
            LoRA adapters, through llama-cpp-python; adapters switch and blend at runtime.
  hf        transformers + PEFT adapters on any device (the run's own base and adapter dirs).

Layout: ``backend`` (the contract every backend implements), ``backends/`` (one module per
kind), ``adapters`` (which adapter files may load: configured directories only), ``openai``
(OpenAI's request bodies and error shape), ``app`` (the FastAPI routes, auth, queue, adapter
switching), ``server`` (uvicorn on a bound socket, clean stop on SIGTERM). The serve stage
(engine/stages/serve.py) builds a backend from the spec and runs the app under uvicorn.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from engine.registry import Registry, Spec

SERVERS = Registry("serve")


class ServeSpec(Spec):
    """What every backend shares: where it listens, who may call it, what it may load."""

    host: str = "127.0.0.1"
    """Loopback by default; set 0.0.0.0 only behind a key (serve.api_key or ENGINE_API_KEY)."""
    port: int = Field(8000, ge=0, le=65535)
    """0 picks a free port (printed at start)."""
    api_key: bool = False
    """Require ``Authorization: Bearer <key>`` on every route but /health. The key itself is a
    secret: it comes from ENGINE_API_KEY (environment or .env), never from config."""
    adapter_dirs: list[str] = []
    """Directories adapters may load from (a run dir, an export dir ...). Nothing outside them
    loads: no ``..``, no absolute path elsewhere, no symlink leading out."""
    adapters: dict[str, str] = {}
    """Adapters loaded at start: name -> path inside adapter_dirs (more load via /lora-adapters)."""
    context_length: int = Field(2048, ge=16)
    """Tokens of prompt + completion per request; longer prompts get context_length_exceeded."""
    threads: int = Field(0, ge=0)
    """CPU threads for generation (0: all cores)."""
    queue: int = Field(16, ge=1)
    """Requests waiting for the model beyond the one running; more get 429 with Retry-After."""
    max_body_bytes: int = Field(1_000_000, ge=1024)
    """Larger request bodies get 413."""
    default_max_tokens: int = Field(256, ge=1)
    """Completion length when a request names none."""


class LlamaCppSpec(ServeSpec):
    gguf: str | None = None
    """Base GGUF inside adapter_dirs or a run's export dir; None: the model group's packaged GGUF."""


class HfSpec(ServeSpec):
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
