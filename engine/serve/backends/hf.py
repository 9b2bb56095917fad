"""The ``hf`` backend: transformers + PEFT, any device, several adapters on one base.

Why PEFT's multi-adapter model and not a model per adapter: the base loads once; each
adapter adds only its low-rank matrices. Requests run in the backend's batch
(engine/serve/backends/hf_batch.py): rows of one forward use different adapters (PEFT's
per-row ``adapter_names``), and a blend's rows run with their set made active and scaled.

Generation is a plain token loop over the KV cache (not ``model.generate``): each token is
yielded as it is made, so a closed stream stops decoding at once, and stop strings are
honoured without ever emitting text past one.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from engine.errors import UserError
from engine.model.names import display_name
from engine.serve import SERVERS, ServeSpec
from engine.serve.adapters import Found, load_arguments, provenance
from engine.serve.backend import AdapterInfo, AdapterScale, BackendSource, GenerateRequest, Opened, Piece, TokenFloor
from engine.serve.backends.hf_batch import HfBatch
from engine.serve.batch import alone


class HfSpec(ServeSpec):
    """``serve=hf``: transformers + PEFT adapters, the run's own base, any device."""

    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"


class HfBackend:
    """A base model, its tokenizer and the PEFT adapters loaded onto it."""

    def __init__(
        self, model, tokenizer, *, model_id: str, context_length: int, device: str, max_batch: int = 1, prefill_chunk: int = 256
    ):
        self.base = model.eval()
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.device = device
        self.context_length = min(context_length, getattr(model.config, "max_position_embeddings", None) or context_length)
        self.peft = None
        """The PeftModel wrapping ``base`` once the first adapter has loaded."""
        self._infos: dict[str, AdapterInfo] = {}
        self._internal: dict[str, str] = {}
        """Public name -> PEFT adapter name (``a0``, ``a1`` ...: PEFT names may not hold dots or slashes)."""
        self.eos = self._eos_ids()
        self.batch = HfBatch(self, size=max_batch, prefill_chunk=prefill_chunk)

    def _eos_ids(self) -> set[int]:
        ids = {self.tokenizer.eos_token_id}
        gen = getattr(self.base, "generation_config", None)
        extra = getattr(gen, "eos_token_id", None)
        ids.update(extra if isinstance(extra, list) else [extra])
        return {i for i in ids if i is not None}

    # --- text -----------------------------------------------------------------------

    def tokenize(self, text: str, *, limit: int | None = None) -> list[int]:
        self._floor.check(text, limit)
        return self.tokenizer(text, add_special_tokens=True).input_ids

    @functools.cached_property
    def _floor(self) -> TokenFloor:
        """Added tokens match as whole texts; any other token string covers at most its length in characters."""
        added = {t.content for t in self.tokenizer.added_tokens_decoder.values()}
        longest = max((len(t) for t in self.tokenizer.get_vocab() if t not in added), default=1)
        return TokenFloor(added, longest, in_bytes=False)

    template: str | None = None
    """The chat template the served run trained with (``BackendSource.template``); None: the tokenizer's own."""

    def render_chat(self, messages: list[dict], *, limit: int | None = None) -> list[int]:
        """The run's template (else the tokenizer's) through engine's one renderer, then the tokenizer's ids:
        the text and ids training built for the same messages (engine.data.templates.render)."""
        from jinja2 import TemplateError

        from engine.data.templates import TemplateStopped, render

        source = self.template or getattr(self.tokenizer, "chat_template", None)
        if not source:
            raise UserError("this model has no chat template; send plain text to /v1/completions instead")
        try:
            text = render(source, messages, add_generation_prompt=True, tokenizer=self.tokenizer)
        except (TemplateError, ValueError, TypeError, KeyError, IndexError) as e:  # raise_exception, bad messages
            raise UserError(f"the chat template of {self.model_id} refused these messages: {e}") from None
        except TemplateStopped as e:  # engine.data.templates says what was reached for
            raise UserError(f"the chat template of {self.model_id} was stopped by the sandbox: {e.reason}") from None
        self._floor.check(text, limit)
        return self.tokenizer(text, add_special_tokens=False).input_ids

    # --- adapters -------------------------------------------------------------------

    def load_adapter(self, name: str, path, *, run: str | None = None, recipe: str | None = None) -> AdapterInfo:
        path = Path(path)
        if name in self._infos:
            raise UserError(f"an adapter named '{name}' is already loaded")
        if path.suffix.lower() == ".gguf":
            raise UserError(
                "the hf backend loads PEFT adapters (a dir with adapter_config.json and adapter_model.safetensors); "
                "GGUF adapters are for serve=llamacpp"
            )
        from peft import PeftModel

        internal = f"a{len(self._internal)}"
        try:
            if self.peft is None:
                self.peft = PeftModel.from_pretrained(self.base, path, adapter_name=internal, is_trainable=False)
            else:
                self.peft.load_adapter(path, adapter_name=internal, is_trainable=False)
        except Exception as e:  # a config or shapes that do not fit this base: the client's to fix
            raise UserError(f"adapter '{name}' does not fit this base model ({type(e).__name__})") from None
        self.peft.eval()
        self._internal[name] = internal
        self._infos[name] = AdapterInfo(name=name, format="peft", run=run, recipe=recipe)
        return self._infos[name]

    def adapters(self) -> list[AdapterInfo]:
        return list(self._infos.values())

    def mixable(self, name: str) -> bool:
        """Whether PEFT can run this adapter per row in a mixed batch (plain LoRA: yes; DoRA: no)."""
        config = self.peft.peft_config[self._internal[name]]
        return str(getattr(config, "peft_type", "")).endswith("LORA") and not getattr(config, "use_dora", False)

    # --- generation -----------------------------------------------------------------

    def generate(self, request: GenerateRequest) -> Iterator[Piece]:
        return alone(self.batch, request)

    def close(self) -> None:
        self.peft = None
        self.base = None


@SERVERS.register("hf", HfSpec)
def build_hf(spec: HfSpec, *, source: BackendSource, adapters: dict[str, Found]) -> Opened:
    """transformers + PEFT: the run's base with serve.adapters and the evaluated run's adapter, on any device.

    The evaluated run's PEFT adapter/ is served under its run dir's name, active at scale 1; a
    layered run's levels load as ``<run>/level_K``, active with ``adapter.scales``; after a full
    fine-tune the base itself is the run's model/ (``source.model``) and nothing more loads.
    """
    adapters, active = dict(adapters), ()
    if source.evaluated is not None:
        run_adapters, active = _run_adapters(source.evaluated, source.scales)
        adapters.update(run_adapters)
    backend = load_hf(
        spec,
        model_spec=source.model,
        quant_spec=source.quantization,
        **load_arguments(adapters),
    )
    backend.template = source.template
    return Opened(backend, active)


def _run_adapters(run: Path, scales: list[float] | None) -> tuple[dict[str, Found], tuple[AdapterScale, ...]]:
    """(the PEFT dirs to load, the set active at start) of a finished run dir."""
    from engine.export.merge import find_trained

    trained = find_trained(run, scales=scales)
    if trained.adapter_dir is None:  # a full fine-tune: its model/ is the base
        return {}, ()
    recipe = provenance(run)[1]
    if trained.levels:
        dirs = {f"{run.name}/level_{k}": trained.adapter_dir / f"level_{k}" for k in trained.levels}
        found = {name: Found(path, "peft", name, run.name, recipe) for name, path in dirs.items()}
        return found, tuple(AdapterScale(name, scale) for name, scale in zip(found, trained.scales, strict=True))
    return {run.name: Found(trained.adapter_dir, "peft", run.name, run.name, recipe)}, (AdapterScale(run.name, 1.0),)


def load_hf(
    spec: HfSpec,
    *,
    model_spec,
    quant_spec=None,
    adapter_paths: dict[str, Path] | None = None,
    run_info: dict[str, dict] | None = None,
) -> HfBackend:
    """The base model built as the run built it, with these PEFT adapters loaded (none active).

    Args:
        spec: the serve group's hf preset (device, context length, threads).
        model_spec: the model group's spec: the base, built as the run built it.
        quant_spec: the quantization group's spec; a quantized base is de-quantized, as export does.
        adapter_paths: name -> PEFT adapter dir, already checked to be inside the allowed dirs.
        run_info: name -> ``{"run": ..., "recipe": ...}`` for /v1/models.
    """
    import torch

    from engine.export.merge import load_base
    from engine.runtime import resolve_device

    if spec.threads:
        torch.set_num_threads(spec.threads)
    device = resolve_device(spec.device)
    if quant_spec is None:
        from engine.quantization import NoQuantSpec

        quant_spec = NoQuantSpec(kind="none")
    # As the export does it: a quantized base is built as trained, then de-quantized.
    model, tokenizer = load_base(model_spec, quant_spec)
    backend = HfBackend(
        model.to(device),
        tokenizer,
        model_id=display_name(model_spec),
        context_length=spec.context_length,
        device=device,
        max_batch=spec.max_batch,
        prefill_chunk=spec.prefill_chunk,
    )
    for name, path in (adapter_paths or {}).items():
        backend.load_adapter(name, path, **(run_info or {}).get(name, {}))
    return backend
