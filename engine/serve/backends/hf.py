"""The ``hf`` backend: transformers + PEFT, any device, several adapters on one base.

Why PEFT's multi-adapter model and not a model per adapter: the base loads once; each
adapter adds only its low-rank matrices. A request's set is activated before its first
token (``set_adapter`` with a scale per adapter: a blend sums ``scale_k * B_k A_k x``), and
an empty set runs the base with every adapter disabled. The app runs one generation at a
time, so the active set cannot change under a running response.

Generation is a plain token loop over the KV cache (not ``model.generate``): each token is
yielded as it is made, so a closed stream stops decoding at once, and stop strings are
honoured without ever emitting text past one.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from engine.errors import UserError
from engine.model.names import display_name
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
    check_ids,
)


class HfSpec(ServeSpec):
    """``serve=hf``: transformers + PEFT adapters, the run's own base, any device."""

    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"


class StopText:
    """Turns the growing decoded text into safe pieces: nothing past a stop string is emitted,
    and a tail that could still become one (``"<|"`` of ``"<|end|>"``) is held back."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = tuple(s for s in stops if s)
        self.sent = 0

    def push(self, text: str) -> tuple[str, bool]:
        """(new text safe to send, whether a stop string was reached)."""
        hits = [i for i in (text.find(s, self.sent) for s in self.stops) if i >= 0]
        if hits:
            out = text[self.sent : min(hits)]
            self.sent = min(hits)
            return out, True
        # k never past the text: a 100 kB stop string costs what the text does, not its square.
        most = len(text) - self.sent
        hold = max((k for s in self.stops for k in range(1, min(len(s), most + 1)) if text.endswith(s[:k])), default=0)
        end = max(self.sent, len(text) - hold)
        out, self.sent = text[self.sent : end], end
        return out, False

    def rest(self, text: str) -> str:
        """At the end of generation: the held-back tail (it never became a stop string)."""
        out, self.sent = text[self.sent :], len(text)
        return out


class HfBackend:
    """A base model, its tokenizer and the PEFT adapters loaded onto it."""

    def __init__(self, model, tokenizer, *, model_id: str, context_length: int, device: str):
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

    def render_chat(self, messages: list[dict], *, limit: int | None = None) -> list[int]:
        # transformers renders chat templates in jinja2's ImmutableSandboxedEnvironment.
        if not getattr(self.tokenizer, "chat_template", None):
            raise UserError("this model has no chat template; send plain text to /v1/completions instead")
        from jinja2 import TemplateError

        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except TemplateError as e:  # the template's own raise_exception, or the sandbox stopping it
            raise UserError(f"the chat template of {self.model_id} refused these messages: {e}") from None
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

    @contextlib.contextmanager
    def _active(self, adapters: tuple[AdapterScale, ...]):
        """The model to run with this adapter set active (and scaled); the base alone if empty."""
        if not adapters or self.peft is None:
            with self.peft.disable_adapter() if self.peft is not None else contextlib.nullcontext():
                yield self.peft or self.base
            return
        from engine.adapter import set_scales

        unknown = [a.name for a in adapters if a.name not in self._internal]
        if unknown:
            raise UserError(f"adapter {unknown[0]!r} is not loaded")
        names = [self._internal[a.name] for a in adapters]
        self.peft.base_model.set_adapter(names, inference_mode=True)
        set_scales(self.peft, {self._internal[a.name]: a.scale for a in adapters})
        yield self.peft

    # --- generation -----------------------------------------------------------------

    def generate(self, request: GenerateRequest) -> Iterator[Piece]:
        import torch

        if not request.prompt_ids:
            raise UserError("the prompt is empty")
        check_ids(request.prompt_ids, self.base.get_input_embeddings().num_embeddings)
        gen = torch.Generator("cpu")
        # torch takes 64 bits: OpenAI's int64 seeds (negative ones too) map one to one.
        seed = request.seed if request.seed is not None else int.from_bytes(os.urandom(8), "little")
        gen.manual_seed(seed & 0xFFFF_FFFF_FFFF_FFFF)
        budget = min(request.max_tokens, self.context_length - len(request.prompt_ids))
        stop = StopText(request.stop)
        ids: list[int] = []
        sent_ids = 0
        text = ""
        with torch.inference_mode(), self._active(request.adapters) as model:
            step = torch.tensor([request.prompt_ids], device=self.device)
            cache = None
            finish = "length"
            for _ in range(max(budget, 0)):
                out = model(input_ids=step, cache=cache, use_cache=True, logits_to_keep=1)
                cache = out.cache
                token = _pick(out.logits[0, -1], request.temperature, request.top_p, gen)
                if token in self.eos:
                    finish = "stop"
                    break
                ids.append(token)
                text = self.tokenizer.decode(ids, skip_special_tokens=True)
                stable = _complete(text)
                piece, stopped = stop.push(stable)
                if stopped:
                    yield Piece(piece, ids[sent_ids:], finish_reason="stop")
                    return
                # One piece per token, empty while text is held back: the app sees every token
                # (a closed stream stops here at once) and counts them for ``usage``.
                yield Piece(piece, ids[sent_ids:])
                sent_ids = len(ids)
                step = torch.tensor([[token]], device=self.device)
        yield Piece(stop.rest(text), ids[sent_ids:], finish_reason=finish)

    def close(self) -> None:
        self.peft = None
        self.base = None


def _complete(text: str) -> str:
    """The text without a trailing incomplete UTF-8 sequence (decoded as up to 3 U+FFFD), which
    the next token may complete; longer runs of U+FFFD are the model's own and go out."""
    tail = len(text) - len(text.rstrip("\ufffd"))
    return text[: len(text) - min(tail, 3)]


def _pick(logits, temperature: float, top_p: float, gen) -> int:
    """Greedy at temperature 0; else a sample from the top-p nucleus of the tempered softmax.

    In float64, with the best logit subtracted before dividing by the temperature: a
    temperature of 1e-300 then gives -inf to every other token (greedy in effect) instead of
    inf/inf = NaN, and the nucleus always keeps its first token, even for a top_p of 1e-300
    (which float32 rounds to 0). Scores that are NaN or inf (an adapter scaled far beyond its
    training) are the request's to fix, so a ``UserError``.
    """
    import torch

    scores = logits.double().cpu()
    if not bool(torch.isfinite(scores).all()):
        raise UserError(
            "the model's next-token scores are not finite (NaN or inf) with this adapter set; "
            "lower the adapter scales (POST /lora-adapters) or send the request to the base model"
        )
    if temperature == 0:
        return int(scores.argmax())
    probs = torch.softmax((scores - scores.max()) / temperature, dim=-1)
    if top_p < 1:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < top_p  # the smallest prefix reaching top_p ...
        keep[0] = True  # ... and at least one token
        sorted_p[~keep] = 0
        return int(order[torch.multinomial(sorted_p, 1, generator=gen)])
    return int(torch.multinomial(probs, 1, generator=gen))


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
        model.to(device), tokenizer, model_id=display_name(model_spec), context_length=spec.context_length, device=device
    )
    for name, path in (adapter_paths or {}).items():
        backend.load_adapter(name, path, **(run_info or {}).get(name, {}))
    return backend
