"""Combinations across config groups that cannot work, caught at validation.

Each group's schema checks its own values; this module checks how the chosen presets fit
together (quantization x adapter x device, attention kernel x device, adapter x stages), so
an impossible run fails before any weight loads, with the reason and a fix.
"""

from __future__ import annotations

import importlib.util
from typing import Any


def cross_checks(specs: dict[str, Any], top: Any, problems: list[str]) -> None:
    """Append a problem for each impossible combination; groups that failed their own schema are skipped."""
    quant, adapter, model = specs.get("quantization"), specs.get("adapter"), specs.get("model")
    stages = list(getattr(top, "stages", None) or [])
    device = getattr(top, "device", "auto")
    quantized = quant is not None and quant.kind != "none"

    if quantized:
        if adapter is not None and adapter.kind == "none":
            problems.append(
                f"quantization: {quant.kind} weights are frozen integer codes and cannot be fully fine-tuned "
                "(adapter=none); train an adapter on top (adapter=lora: QLoRA) or use quantization=none"
            )
        if importlib.util.find_spec("bitsandbytes") is None:
            problems.append(
                f"quantization: {quant.kind} needs the bitsandbytes package; `pip install 'engine[quant]'` "
                "or use quantization=none"
            )
        dora = adapter is not None and (adapter.kind == "dora" or getattr(adapter, "method", None) == "dora")
        if quant.kind == "int8" and dora and _resolved_device(device) == "cpu":
            # Measured with bitsandbytes 0.50.2: DoRA's weight-norm pass drops the int8 scales
            # (state.SCB) on CPU and the next forward fails.
            problems.append(
                "quantization: int8 with DoRA fails on CPU (bitsandbytes' CPU int8 path loses the weight "
                "scales after DoRA's weight-norm pass); use quantization=nf4 with DoRA, or adapter=lora with int8"
            )
        if _resolved_device(device) == "mps":
            problems.append(
                f"quantization: bitsandbytes has no kernels for Apple MPS, so {quant.kind} cannot run there; "
                "use quantization=none on MPS, or device=cpu (slow) / a CUDA machine for quantized training"
            )

    if model is not None and model.attn_implementation == "flash_attention_2" and _resolved_device(device) != "cuda":
        problems.append(
            f"model.attn_implementation: flash_attention_2 runs only on CUDA GPUs; use sdpa on {_resolved_device(device)}"
        )

    if adapter is not None and top is not None:
        layered = adapter.kind == "layered"
        if layered and "train" in stages:
            problems.append(
                "stages: adapter=layered trains its levels in the train_layered stage; "
                "replace 'train' with 'train_layered' in stages"
            )
        if "train_layered" in stages and not layered:
            problems.append(
                f"stages: train_layered needs adapter=layered (got adapter kind '{adapter.kind}'); "
                "use adapter=layered or the plain 'train' stage"
            )


def _resolved_device(device: str) -> str:
    if device != "auto":
        return device
    from engine.runtime import resolve_device

    return resolve_device("auto")
