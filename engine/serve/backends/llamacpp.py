"""The ``llamacpp`` backend: one GGUF base in llama.cpp, GGUF LoRA adapters switched per request.

Why the low-level adapter API: ``Llama(lora_path=...)`` fixes one adapter for the life of the
model. Here every adapter file is loaded once (``llama_adapter_lora_init``) and a request's
set -- one adapter, a blend of several with scales, or none -- is put on a context with
``llama_set_adapters_lora``, so a set costs no reload of the base.

Generation is continuous batching (engine/serve/backends/llamacpp_batch.py): up to
``serve.max_batch`` sequences, each with its own KV cells, sampler and adapter set, in a home
context and, for other adapter sets, side contexts with their set put on once (that module's
doc says why); ``generate`` runs one request through that batch alone. Every request evaluates
its whole prompt in its own KV sequence, so its answer never depends on what ran before (the
serial backend's prefix-cache reuse is gone; see that module).

Why token ids, not text: the chat template is rendered here (sandboxed jinja, the GGUF's own
``tokenizer.chat_template``) and tokenized with special tokens parsed; the ids go to
``generate``. On SmolLM2, ``Llama.__call__`` with the ChatML prompt *text* answered differently
(and wrongly) where the same token ids as transformers' gave its answer (ENV-NOTES "Parity trap").
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from engine.errors import UserError
from engine.native import check_llama_cpp
from engine.serve import SERVERS, ServeSpec
from engine.serve.adapters import Found, load_arguments, provenance
from engine.serve.backend import (
    AdapterInfo,
    AdapterScale,
    BackendSource,
    GenerateRequest,
    Opened,
    Piece,
    TokenFloor,
)
from engine.serve.backends.llamacpp_batch import LlamaCppBatch, token_bytes

GGUF_MAGIC = b"GGUF"
_HOLDER_CTX = 256
"""Context of the ``Llama`` that holds the model: nothing decodes there (llama.cpp pads smaller ones to 256)."""


class LlamaCppSpec(ServeSpec):
    """``serve=llamacpp``: a GGUF base and GGUF LoRA adapters, on CPU."""

    gguf: str | None = None
    """Base GGUF inside adapter_dirs or a run's export dir; None: the model group's packaged GGUF."""


@SERVERS.register("llamacpp", LlamaCppSpec)
def build_llamacpp(spec: LlamaCppSpec, *, source: BackendSource, adapters: dict[str, Found]) -> Opened:
    """A GGUF base through llama-cpp-python with serve.adapters and the evaluated run's GGUF LoRA.

    The evaluated run's weights come from its export: export/adapter-lora.gguf on the GGUF it
    was exported for, active at scale 1 under the run dir's name; after a full fine-tune its
    exported model GGUF is the base. A run that never exported its LoRA gets it written here
    first (onto the model group's packaged GGUF).
    """
    adapters, active, gguf = dict(adapters), (), None
    if source.evaluated is not None:
        lora, gguf = _run_gguf(source)
        if lora is not None:
            run = source.evaluated
            adapters[run.name] = Found(lora, "gguf", run.name, run.name, provenance(run)[1])
            active = (AdapterScale(run.name, 1.0),)
    backend = load_llamacpp(
        spec,
        model_spec=source.model,
        gguf_path=gguf,
        **load_arguments(adapters),
    )
    backend.template = source.template
    return Opened(backend, active)


def _run_gguf(source: BackendSource) -> tuple[Path | None, Path | None]:
    """(the LoRA GGUF to load, the base GGUF) of the finished run ``source.evaluated``; None: the default."""
    from engine.export.manifest import base_gguf_of, read_manifest
    from engine.export.merge import find_trained

    run = source.evaluated
    trained = find_trained(run, scales=source.scales)
    export = run / "export"
    files = read_manifest(export)
    if trained.adapter_dir is None:
        models = [export / n for n, e in files.items() if e.get("kind") == "model"]
        if not models:
            raise UserError(
                f"serve: run {run.name} is a full fine-tune with no GGUF export; export it first "
                f"(python -m engine recipe=export_smollm2 eval.run_dir={run} 'stages=[merge,export_gguf]') or use serve=hf"
            )
        return None, models[0]
    lora = export / "adapter-lora.gguf"
    if lora.is_file():
        return lora, base_gguf_of(files["adapter-lora.gguf"], export) if "adapter-lora.gguf" in files else None
    return _export_lora(trained, source), None


def _export_lora(trained, source: BackendSource) -> Path:
    """Write the run's LoRA as a GGUF adapter into this run dir (for the packaged GGUF base)."""
    from engine.export.gguf import write_lora_gguf
    from engine.model import convert_gguf_once

    model = source.model
    if model.kind != "gguf":
        raise UserError(
            f"serve: run {source.evaluated.name} has no export/adapter-lora.gguf and its base is not a packaged "
            "GGUF; export it first (stages=[merge,export_gguf] with eval.run_dir) or use serve=hf"
        )
    config = json.loads((convert_gguf_once(model.package, model.file) / "config.json").read_text())
    out = source.out_dir / "export"
    out.mkdir(parents=True, exist_ok=True)
    print("[engine] serve: writing the run's LoRA as a GGUF adapter (once) -> export/adapter-lora.gguf", flush=True)
    return write_lora_gguf(trained, config, out / "adapter-lora.gguf")


def load_llamacpp(
    spec: LlamaCppSpec,
    *,
    model_spec=None,
    gguf_path: Path | None = None,
    adapter_paths: dict[str, Path] | None = None,
    run_info: dict[str, dict] | None = None,
) -> LlamaCppBackend:
    """A GGUF base through llama-cpp-python with these GGUF LoRA adapters loaded (none active).

    Args:
        spec: the serve group's llamacpp preset (context length, threads, max_batch, prefill_chunk).
        model_spec: the model group's spec; its packaged GGUF is the base when neither
            ``gguf_path`` nor ``spec.gguf`` names one (the offline default, SmolLM2 Q4_1).
        gguf_path: the base GGUF, already resolved by the caller (a run's export, say).
        adapter_paths: name -> GGUF LoRA file, already checked to be inside the allowed dirs.
        run_info: name -> ``{"run": ..., "recipe": ...}`` for /v1/models; an adapter without an
            entry gets them from the run dir it lies in (the nearest parent with config.yaml).
    """
    base = _base_path(spec, model_spec, gguf_path)
    backend = LlamaCppBackend(
        base,
        context_length=spec.context_length,
        threads=spec.threads or os.cpu_count() or 1,
        max_batch=spec.max_batch,
        prefill_chunk=spec.prefill_chunk,
    )
    try:
        for name, path in (adapter_paths or {}).items():
            info = (run_info or {}).get(name) or {}
            backend.load_adapter(name, path, run=info.get("run"), recipe=info.get("recipe"))
    except BaseException:
        backend.close()
        raise
    return backend


def _base_path(spec: LlamaCppSpec, model_spec, gguf_path: Path | None) -> Path:
    if gguf_path is not None:
        return Path(gguf_path)
    if spec.gguf:
        return Path(spec.gguf).expanduser()
    if getattr(model_spec, "kind", None) == "gguf":
        from engine.model import gguf_path as packaged

        return packaged(model_spec.package, model_spec.file)
    what = f"model={model_spec.kind}" if model_spec is not None else "no model group"
    raise UserError(
        f"serve.gguf: the llamacpp backend needs a GGUF base and {what} ships none; set serve.gguf to an exported "
        "model-<format>.gguf (export_gguf writes one), use model=smollm2_135m (its packaged GGUF), or serve=hf"
    )


@dataclass
class _Adapter:
    info: AdapterInfo
    handle: object
    """The ``llama_adapter_lora *`` from llama_adapter_lora_init; freed in close()."""
    source: Path


class LlamaCppBackend:
    """One ``llama_cpp.Llama`` (loaded once), its LoRA adapters and its batch; see the module doc.

    ``self._llm`` holds the model, its vocabulary and metadata (tokenizing, the chat template);
    its own one-sequence context is left at the smallest size, since every decode runs in
    ``self.batch``'s contexts. Not thread-safe by design: one thread drives the batch (the
    server's scheduler, or ``generate``). A ``generate`` still open when another starts ends
    with an error at its next step instead of silently losing the pieces the newer one's steps
    made for it.
    """

    def __init__(self, path: Path, *, context_length: int, threads: int, max_batch: int = 1, prefill_chunk: int = 256):
        check_llama_cpp()  # a build that crashes at its first decode is refused with the fix, not a SIGSEGV
        import llama_cpp

        _check_gguf_file(path, "serve.gguf")
        try:
            self._llm = llama_cpp.Llama(
                str(path),
                n_ctx=_HOLDER_CTX,
                n_batch=_HOLDER_CTX,
                n_threads=threads,
                n_threads_batch=threads,
                logits_all=False,
                verbose=False,
            )
        except (ValueError, RuntimeError):
            raise UserError(
                f"serve.gguf: llama.cpp could not load {path.name}{_gguf_kind_hint(path)}; point serve.gguf at a "
                "complete GGUF model file (export_gguf writes model-<format>.gguf)"
            ) from None
        self._lib = llama_cpp
        self.model_id = path.stem
        self.context_length = context_length
        self._adapters: dict[str, _Adapter] = {}
        try:
            self.batch = LlamaCppBatch(
                self._llm,
                size=max_batch,
                prefill_chunk=prefill_chunk,
                context_length=context_length,
                threads=threads,
                adapters=self._adapters,
            )
        except BaseException:
            self._llm.close()
            self._llm = None
            raise
        self._alone: set[int] = set()
        """Slots of ``generate`` calls still open (a newer one ends them; see the class doc)."""

    # --- text -> ids -----------------------------------------------------------------

    def tokenize(self, text: str, *, limit: int | None = None) -> list[int]:
        if not text:
            return []
        self._floor.check(text, limit)
        return self._model().tokenize(text.encode("utf-8"), add_bos=False, special=True)

    @cached_property
    def _floor(self) -> TokenFloor:
        """Control, user-defined and unknown tokens are what ``special=True`` matches as whole
        texts; every other token is at most its longest piece in bytes (SmolLM2: 81). One pass
        over the vocabulary, ~0.2 s for 49,152 tokens, on the first request."""
        import llama_cpp

        llm = self._model()
        vocab = llm._model.vocab
        whole = llama_cpp.LLAMA_TOKEN_ATTR_CONTROL | llama_cpp.LLAMA_TOKEN_ATTR_USER_DEFINED | llama_cpp.LLAMA_TOKEN_ATTR_UNKNOWN
        specials, longest = [], 1
        for token in range(llm.n_vocab()):
            if llama_cpp.llama_vocab_get_attr(vocab, token) & whole:
                specials.append(llm._model.token_get_text(token))
            else:
                longest = max(longest, len(self._piece(token)))
        return TokenFloor(specials, longest, in_bytes=True)

    template: str | None = None
    """The chat template the served run trained with (``BackendSource.template``); None: the GGUF's own."""

    def render_chat(self, messages: list[dict], *, limit: int | None = None) -> list[int]:
        """The run's template (else the GGUF's) through engine's one renderer, with the file's BOS/EOS
        texts and the assistant turn opened; then its ids (engine.data.templates.render)."""
        from jinja2.exceptions import TemplateError

        from engine.data.templates import TemplateStopped, render

        source = self._template
        try:
            bos, eos = self._special_text("bos"), self._special_text("eos")
            text = render(source, messages, add_generation_prompt=True, bos_token=bos, eos_token=eos)
        except (TemplateError, ValueError, TypeError, KeyError, IndexError) as e:
            raise UserError(f"chat template of {self.model_id} refused these messages: {e}") from None
        except TemplateStopped as e:  # engine.data.templates says what was reached for
            raise UserError(f"chat template of {self.model_id} was stopped by the sandbox: {e.reason}") from None
        return self.tokenize(text, limit=limit)

    @cached_property
    def _template(self) -> str:
        """The template source, compiled once to say early if it cannot be (the renderer caches it)."""
        from jinja2.exceptions import TemplateSyntaxError

        from engine.data.templates import compiled

        source = self.template or self._model().metadata.get("tokenizer.chat_template")
        if not source:
            raise UserError(
                f"{self.model_id} carries no chat template (GGUF key tokenizer.chat_template); use /v1/completions "
                "with your own prompt text, or serve a GGUF exported by export_gguf (it embeds the training template)"
            )
        try:
            compiled(source)
        except TemplateSyntaxError as e:
            raise UserError(f"chat template of {self.model_id} does not compile (line {e.lineno}: {e.message})") from None
        return source

    def _special_text(self, which: str) -> str:
        """The text of the file's BOS/EOS token; empty when the file names none.

        llama.cpp falls back to a default id (11 for a gpt2 vocab) when the key is missing, and a
        template would then render that token; transformers renders nothing, and so do we.
        """
        llm = self._model()
        named = llm.metadata.get(f"tokenizer.ggml.{which}_token_id")
        return llm._model.token_get_text(int(named)) if named is not None else ""

    # --- generation ------------------------------------------------------------------

    def generate(self, request: GenerateRequest) -> Iterator[Piece]:
        """One request through ``self.batch`` alone (``engine.serve.batch.alone``).

        The checks run on the call (``batch.add``), so a bad request (unknown adapter, prompt
        past the context) fails before anything streams. Stop strings, UTF-8 and finish reasons:
        engine/serve/backends/llamacpp_batch.py. A ``generate`` of this backend still open ends
        with an error at its next piece (the class doc says why).
        """
        from engine.serve.batch import alone

        self._model()  # closed: fail on the call
        for slot in self._alone:
            self.batch.fail(slot, RuntimeError("another generation started on this llama.cpp backend before this one finished"))
        self._alone.clear()
        before = set(self.batch.live())
        pieces = alone(self.batch, request)
        self._alone.update(set(self.batch.live()) - before)
        return pieces

    def _piece(self, token: int) -> bytes:
        """The token's bytes (special tokens as nothing)."""
        return token_bytes(self._lib, self._model()._model.vocab, token)

    # --- adapters --------------------------------------------------------------------

    def load_adapter(self, name: str, path, *, run: str | None = None, recipe: str | None = None) -> AdapterInfo:
        """Load a GGUF LoRA once and keep it under ``name``; loading the same file again is a no-op."""
        import llama_cpp

        path = Path(path)
        if name in self._adapters:
            known = self._adapters[name]
            if known.source.resolve() == path.resolve():
                return known.info
            raise UserError(f"adapter '{name}' is already loaded from another file; pick another name")
        if path.is_dir() or path.suffix == ".safetensors":
            raise UserError(
                f"adapter '{name}' ({path.name}) is a PEFT adapter; the llamacpp backend applies GGUF LoRA adapters: "
                "export it with export_gguf (export.lora=true) and load adapter-lora.gguf, or serve it with serve=hf"
            )
        _check_gguf_file(path, f"adapter '{name}'")
        handle = llama_cpp.llama_adapter_lora_init(self._model().model, str(path).encode("utf-8"))
        if not handle:
            raise UserError(
                f"adapter '{name}': llama.cpp could not apply {path.name} to {self.model_id}{_gguf_kind_hint(path)}. "
                "A GGUF LoRA fits only the base it was trained on (same architecture and shapes); export_gguf writes "
                "adapter-lora.gguf with the base it belongs to in export/manifest.json"
            )
        if run is None and recipe is None:
            run, recipe = provenance(path)
        info = AdapterInfo(name=name, format="gguf", run=run, recipe=recipe)
        self._adapters[name] = _Adapter(info=info, handle=handle, source=path)
        return info

    def adapters(self) -> list[AdapterInfo]:
        return [a.info for a in self._adapters.values()]

    # --- lifetime --------------------------------------------------------------------

    def _model(self):
        if self._llm is None:
            raise UserError("this llama.cpp backend is closed")
        return self._llm

    def close(self) -> None:
        """Free the batch (samplers, then its context, which holds the adapter set), then every
        adapter, then the model: each before what it points into (an adapter freed after its
        model, or a context after its adapters, is a use-after-free)."""
        llm, self._llm = getattr(self, "_llm", None), None
        if llm is None:
            return
        llama_cpp = self._lib  # not imported here: at interpreter exit imports fail

        batch = getattr(self, "batch", None)
        if batch is not None:
            batch.close()
        for adapter in self._adapters.values():
            llama_cpp.llama_adapter_lora_free(adapter.handle)
        self._adapters.clear()
        llm.close()

    def __del__(self):
        with contextlib.suppress(Exception):  # a backend nobody closed, at interpreter exit
            self.close()


# --- helpers ---------------------------------------------------------------------------


def _check_gguf_file(path: Path, what: str) -> None:
    """Missing or not a GGUF at all: say so by file name (never the local path)."""
    if not path.is_file():
        raise UserError(f"{what}: {path.name} does not exist or is not a file")
    with open(path, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise UserError(f"{what}: {path.name} is not a GGUF file (it does not start with the GGUF magic bytes)")


def _gguf_kind_hint(path: Path) -> str:
    """`` (it is a LoRA adapter, not a model)`` and the like, when the header says so; else nothing."""
    try:
        import gguf

        reader = gguf.GGUFReader(path)
        field = reader.get_field("general.type")
        kind = field.contents() if field is not None else None
        arch = reader.get_field("general.architecture")
        arch = arch.contents() if arch is not None else None
    except Exception:
        return " (the file is damaged or truncated)"
    parts = [f"general.type={kind}" if kind else "", f"architecture {arch}" if arch else ""]
    said = ", ".join(p for p in parts if p)
    return f" ({said})" if said else ""
