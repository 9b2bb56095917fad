"""The ``serve`` group: an OpenAI-compatible HTTP server over a trained model and its adapters.

Kinds (the preset is the backend; ``serve=hf`` swaps the whole subtree):
  llamacpp  a GGUF base (the packaged SmolLM2 Q4_1 by default, or a run's export) with GGUF
            LoRA adapters, through llama-cpp-python; adapters switch and blend at runtime.
  hf        transformers + PEFT adapters on any device (the run's own base and adapter dirs).

Layout, from the stages down:
  server.py    ``serve``: the serve stage's work (open the backend, run the app under uvicorn)
  chat.py      ``terminal_chat``: the chat stage's work; the conversation loop
  matrix.py    ``adapter_matrix``: the adapter_matrix stage's work; the QA matrix
  backends/    ``open_backend`` and one module per kind: its spec, its builder, its backend;
               ``<kind>_batch.py``: that kind's batch
  backend.py   the contract: what a builder gets (``BackendSource``) and gives (``Opened``),
               and the ``Backend`` protocol the routes, the chat and the matrix drive
  adapters.py  which adapter files may load: configured directories only
  batch.py     the batch contract (add, step, drop): continuous batching, one request alone
  app.py       the FastAPI routes (then state, limits, worker, stream, guard; see its doc);
               worker.py is the scheduler: one thread stepping the backend's batch
  openai.py    OpenAI's request bodies and error shape
  ui.py        the page and its read-only runs view

Adding a backend: a module in backends/ (a ``ServeSpec`` subclass and a builder registered
here under the preset's ``kind``, see backend.py), its import in backends/__init__.py, and a
preset YAML in engine/conf/serve/.
"""

from __future__ import annotations

from pydantic import Field, field_validator

from engine.registry import Registry, Spec, Strict

SERVERS = Registry("serve")


class ChatOptions(Strict):
    """The terminal chat (recipe chat, engine/serve/chat.py): how it answers when it starts."""

    system: str | None = None
    """System message of every conversation (``/system TEXT`` changes it, ``/system`` clears it)."""
    temperature: float = Field(0.7, ge=0, le=2)
    """0: greedy (the same answer every time); higher: more varied answers."""
    top_p: float = Field(0.95, gt=0, le=1)
    """Sample from the smallest set of tokens holding this much probability."""
    max_tokens: int | None = Field(None, ge=1)
    """Longest answer in tokens; null: serve.default_max_tokens."""
    seed: int | None = None
    """Sampling seed for reproducible answers at temperature > 0; null: a fresh one per answer."""
    adapters: dict[str, float] = {}
    """Active adapter set at start (name -> scale); empty: the run's adapter with eval.run_dir, else the base."""


class MatrixOptions(Strict):
    """The adapter QA matrix (stage adapter_matrix, engine/serve/matrix.py): what is compared.

    Rows are the base, each loaded adapter alone (serve.adapters, the run of eval.run_dir) and
    each blend here; prompts are the held-out split (eval.split, eval.max_examples) and the
    behaviour suites (eval.suites), all greedy.
    """

    blends: dict[str, dict[str, float]] = {}
    """Named blends: row label -> {adapter name: scale}, e.g. {half: {a: 0.5, b: 0.5}}."""
    metrics: list[str] = ["token_f1", "rougeL"]
    """Text metrics against the references, by name from engine/evaluate/metrics.py (no model-based ones)."""

    @field_validator("metrics")
    @classmethod
    def _text_metrics(cls, v: list[str]) -> list[str]:
        from engine.evaluate.metrics import METRICS, unknown

        problem = unknown(v)
        if problem:
            raise ValueError(problem)
        needs_model = [n for n in v if METRICS[n].family == "model"]
        if needs_model:
            valid = ", ".join(n for n, m in METRICS.items() if m.family != "model")
            raise ValueError(f"{needs_model} need the model's logits or an embedder, not a served backend; valid: {valid}")
        return v


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
    max_batch: int = Field(8, ge=1, le=256)
    """Sequences decoded together (continuous batching): requests join the running batch at its
    next step. Higher: more tokens/s in all, each stream a little slower; 1: one at a time."""
    prefill_chunk: int = Field(256, ge=1)
    """Prompt tokens a newcomer reads per step, so one long prompt never stalls the other streams
    for its whole length."""
    queue: int = Field(16, ge=1)
    """Requests waiting for a place in the batch (beyond ``max_batch``); more get 429 with Retry-After."""
    max_body_bytes: int = Field(1_000_000, ge=1024)
    """Larger request bodies get 413."""
    default_max_tokens: int = Field(256, ge=1)
    """Completion length when a request names none."""
    runs_dir: str | None = "outputs"
    """Run dirs the page's runs view lists, read-only (relative to the working directory);
    null hides the runs view."""
    chat: ChatOptions = ChatOptions()
    """The terminal chat over this backend (recipe chat)."""
    matrix: MatrixOptions = MatrixOptions()
    """The adapter QA matrix over this backend (stage adapter_matrix)."""
