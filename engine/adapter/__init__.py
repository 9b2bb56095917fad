"""The ``adapter`` group: which parameters train (PEFT LoRA and friends, or all of them).

Kinds:
  lora     low-rank updates B@A on the target layers, scaled by alpha / r; the base stays frozen.
  dora     LoRA plus a trained per-output magnitude (weight-decomposed LoRA): closer to full
           fine-tuning at the same rank, ~20-30% slower per step.
  rslora   LoRA scaled by alpha / sqrt(r): higher ranks keep learning instead of stalling.
  layered  several LoRA levels trained one after another, each on top of the previous (frozen)
           ones, saved separately and loadable stacked with a scale each (stage train_layered).
  none     full fine-tune: every parameter trains.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from engine.errors import ConfigError
from engine.registry import Registry, Spec

ADAPTERS = Registry("adapter")


class NoAdapterSpec(Spec):
    pass


class LoraSpec(Spec):
    r: int = Field(16, ge=1)
    """Rank of the update: higher = more capacity and memory."""
    alpha: float = 32
    """Scale numerator: the update is multiplied by alpha / r (alpha / sqrt(r) for rslora)."""
    dropout: float = Field(0.05, ge=0, lt=1)
    """Dropout on the adapter's input during training."""
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    """Module names to adapt (``q_proj`` ...), or every linear layer except the LM head."""
    bias: Literal["none", "all", "lora_only"] = "none"
    """Which biases train too (none keeps the adapter file small)."""
    modules_to_save: list[str] = []
    """Extra modules trained in full and saved with the adapter (e.g. ``lm_head``)."""
    fused: bool = True
    """Train each LoRA layer as one fused node on CPU (engine/fused_lora.py): same result,
    fewer passes over activations; false = PEFT's own forward (for A/B comparisons)."""


class RsLoraSpec(LoraSpec):
    r: int = Field(64, ge=1)
    """Rank: rsLoRA's alpha / sqrt(r) scale is what lets higher ranks pay off."""
    alpha: float = 16


class LayeredSpec(LoraSpec):
    r: int = Field(8, ge=1)
    """Rank of each level (several levels stack, so each is smaller than a single adapter)."""
    alpha: float = 16
    levels: int = Field(3, ge=1)
    """How many adapter levels to train in sequence (saved as adapter/level_1 ... level_N)."""
    method: Literal["lora", "dora", "rslora"] = "lora"
    """The adapter type of every level."""
    steps: list[int] = []
    """Optimizer steps per level; empty = ``train.max_steps`` for each level."""
    scales: list[float] = []
    """Scale of each level when stacked for evaluation after training; empty = 1.0 each."""

    @model_validator(mode="after")
    def _one_value_per_level(self):
        for name in ("steps", "scales"):
            given = getattr(self, name)
            if given and len(given) != self.levels:
                raise ValueError(f"{name} has {len(given)} values but levels is {self.levels}; give one per level or none")
        if any(s < 1 for s in self.steps):
            raise ValueError("steps must all be >= 1")
        return self


def lora_config(spec: LoraSpec, method: str = "lora"):
    from peft import LoraConfig

    return LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=spec.target_modules,
        bias=spec.bias,
        modules_to_save=spec.modules_to_save or None,
        task_type="CAUSAL_LM",
        use_dora=method == "dora",
        use_rslora=method == "rslora",
    )


def attach(model, spec: LoraSpec, method: str = "lora", **kw):
    """``get_peft_model``, with target names checked against the model.

    PEFT fails with a bare ``NoMatchingPeftModuleError`` when no target matches and silently
    skips a target that matches nothing when others do (a typo then trains fewer layers).
    Both are told here with the model's own linear layer names, the values that would work.
    """
    from peft import get_peft_model

    from engine.model import linear_module_names

    missing = unmatched_targets(model, spec.target_modules)
    if missing:
        names = ", ".join(linear_module_names(model))
        shown = ", ".join(missing)
        if len(missing) == len(spec.target_modules):
            raise ConfigError(
                f"adapter.target_modules: no module named {shown} in this model; its linear layers are: {names} "
                "(or all-linear: every linear layer but the output head)"
            )
        print(f"[engine] adapter.target_modules: {shown} matches no module in this model (its linear layers: {names})")
    with warnings.catch_warnings():
        # PEFT asks the model the name transformers deprecated: a warning for PEFT, not for the user.
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        return get_peft_model(model, lora_config(spec, method), **kw)


def unmatched_targets(model, targets: list[str] | str) -> list[str]:
    """Target names that no module name equals or ends with (PEFT's rule for a list of names)."""
    if isinstance(targets, str):  # all-linear
        return []
    names = [n for n, _ in model.named_modules()]
    return [t for t in targets if not any(n == t or n.endswith(f".{t}") for n in names)]


def _fast_cpu(model, spec: LoraSpec):
    """LoRA's input dropout drawn sparsely (engine/speed/dropout.py: same distribution, ~6x cheaper)
    and, if ``spec.fused``, each LoRA layer one autograd node (engine/speed/fused_lora.py); both
    change only how the CPU computes, not what, and each is checked against PEFT's own code
    first (skipped with a notice if it differs)."""
    from engine.speed.apply import lora_speedups

    lora_speedups(model, fused=spec.fused)
    return model


@ADAPTERS.register("lora", LoraSpec)
def build_lora(spec: LoraSpec, *, model):
    """LoRA: low-rank updates on the target layers; the base stays frozen."""
    return _fast_cpu(attach(model, spec), spec)


@ADAPTERS.register("dora", LoraSpec)
def build_dora(spec: LoraSpec, *, model):
    """DoRA: LoRA direction plus a trained magnitude per output feature."""
    return _fast_cpu(attach(model, spec, "dora"), spec)


@ADAPTERS.register("rslora", RsLoraSpec)
def build_rslora(spec: RsLoraSpec, *, model):
    """Rank-stabilised LoRA: scale alpha / sqrt(r), so large ranks keep learning."""
    return _fast_cpu(attach(model, spec, "rslora"), spec)


@ADAPTERS.register("none", NoAdapterSpec)
def build_none(spec: NoAdapterSpec, *, model):
    """Full fine-tune: every parameter trains."""
    for p in model.parameters():
        p.requires_grad_(True)
    return model


# --- layered adapters ------------------------------------------------------------------


def level_name(level: int) -> str:
    return f"level_{level}"


@ADAPTERS.register("layered", LayeredSpec)
def build_layered(spec: LayeredSpec, *, model):
    """Layered LoRA: level 1 here; the train_layered stage adds and trains the next levels."""
    return _fast_cpu(attach(model, spec, spec.method, adapter_name=level_name(1)), spec)


def add_level(model, spec: LayeredSpec, level: int) -> None:
    """Add level ``level`` (if new), make levels 1..level active and only this level trainable.

    PEFT marks every active adapter trainable; earlier levels are then frozen again, so each
    level learns what the frozen stack below it has not.
    """
    name = level_name(level)
    if name not in model.peft_config:
        model.add_adapter(name, lora_config(spec, spec.method))
        _fast_cpu(model, spec)
    model.base_model.set_adapter([level_name(k) for k in range(1, level + 1)])
    for pname, p in model.named_parameters():
        p.requires_grad_(f".{name}." in pname)


def set_scales(model, scales: dict[str, float]) -> None:
    """Multiply each named adapter's initial scale (alpha / r) by the given factor, in every layer."""
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if isinstance(module, LoraLayer):
            for name, scale in scales.items():
                module.set_scale(name, scale)


def load_stacked(base_model, adapter_dir: str | Path, levels: list[int], scales: list[float] | None = None):
    """Load saved levels (``adapter_dir/level_K``) onto a base model, all active, each scaled.

    The result computes ``W x + sum_k scale_k * (alpha/r) * B_k A_k x``: levels 1+2 at full
    strength reproduce the model level 2 was trained on; other scales blend the levels.
    """
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    scales = scales if scales is not None else [1.0] * len(levels)
    if len(scales) != len(levels):
        raise ValueError(f"{len(levels)} levels but {len(scales)} scales")
    names = [level_name(k) for k in levels]
    missing = [str(adapter_dir / n) for n in names if not (adapter_dir / n / "adapter_config.json").is_file()]
    if missing:
        raise FileNotFoundError(f"no saved adapter level at: {', '.join(missing)}")
    model = PeftModel.from_pretrained(base_model, adapter_dir / names[0], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(adapter_dir / name, adapter_name=name)
    model.base_model.set_adapter(names, inference_mode=True)
    set_scales(model, dict(zip(names, scales, strict=True)))
    model.eval()
    return model


def build_for_run(model_spec, quant_spec, adapter_spec, *, adapter_dir: Path | None = None, progress: bool = True):
    """The run's model: base (quantized as configured), prepared for training, with the adapter.

    ``adapter_dir``: a trained PEFT adapter to load instead of a fresh one (evaluating a
    finished run); for adapter=layered, its levels (``adapter_dir/level_K``) stacked with
    the spec's scales. Returns (model, tokenizer).
    """
    from engine.model import MODELS
    from engine.quantization import QUANTIZATIONS

    qconfig = QUANTIZATIONS.build(quant_spec)
    model, tok = MODELS.build(model_spec, quantization_config=qconfig, progress=progress)
    if qconfig is not None:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=model_spec.gradient_checkpointing)
    elif model_spec.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    if adapter_dir is not None and adapter_spec.kind == "layered":
        levels = list(range(1, adapter_spec.levels + 1))
        return load_stacked(model, adapter_dir, levels, adapter_spec.scales or None), tok
    if adapter_dir is not None:
        from peft import PeftModel

        return PeftModel.from_pretrained(model, adapter_dir), tok
    return ADAPTERS.build(adapter_spec, model=model), tok
