"""The ``quantization`` group: how base weights are stored (bitsandbytes 4/8-bit or not).

Builders return a ``transformers.BitsAndBytesConfig`` (or None), passed to the model loader.
"""

from __future__ import annotations

from typing import Literal

from engine.registry import Registry, Spec

QUANTIZATIONS = Registry("quantization")


class NoQuantSpec(Spec):
    pass


class FourBitSpec(Spec):
    double_quant: bool = True
    """Quantize the quantization constants too (saves ~0.4 bit/param)."""
    compute_dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    """Dtype the de-quantized weights are multiplied in."""


@QUANTIZATIONS.register("none", NoQuantSpec)
def build_none(spec: NoQuantSpec):
    """Full-precision weights."""
    return None


def _four_bit(spec: FourBitSpec, quant_type: str):
    from transformers import BitsAndBytesConfig

    from engine.model import torch_dtype

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=spec.double_quant,
        bnb_4bit_compute_dtype=torch_dtype(spec.compute_dtype),
    )


@QUANTIZATIONS.register("nf4", FourBitSpec)
def build_nf4(spec: FourBitSpec):
    """4-bit NormalFloat (QLoRA)."""
    return _four_bit(spec, "nf4")
