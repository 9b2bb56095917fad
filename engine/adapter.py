"""The ``adapter`` group: which parameters train (PEFT LoRA and friends, or all of them)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from engine.registry import Registry, Spec

ADAPTERS = Registry("adapter")


class NoAdapterSpec(Spec):
    pass


class LoraSpec(Spec):
    r: int = Field(16, ge=1)
    """Rank of the update: higher = more capacity and memory."""
    alpha: float = 16
    """Scale numerator: the update is multiplied by alpha / r."""
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    bias: Literal["none", "all", "lora_only"] = "none"
    modules_to_save: list[str] = []


def _lora(spec: LoraSpec, model, **extra):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=spec.target_modules,
        bias=spec.bias,
        modules_to_save=spec.modules_to_save or None,
        task_type="CAUSAL_LM",
        **extra,
    )
    return get_peft_model(model, config)


@ADAPTERS.register("lora", LoraSpec)
def build_lora(spec: LoraSpec, *, model):
    """LoRA: low-rank updates on the target layers; the base stays frozen."""
    return _lora(spec, model)


@ADAPTERS.register("none", NoAdapterSpec)
def build_none(spec: NoAdapterSpec, *, model):
    """Full fine-tune: every parameter trains."""
    for p in model.parameters():
        p.requires_grad_(True)
    return model
