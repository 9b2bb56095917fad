"""The ``quantization`` group: how base weights are stored (bitsandbytes 4/8-bit or not).

Builders return a ``transformers.BitsAndBytesConfig`` (or None), passed to the model loader;
the run context then prepares a quantized model for k-bit training (frozen base, fp32 norms,
input grads for checkpointing). Only adapters train on top of quantized weights (QLoRA):
the integer codes themselves have no gradient.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from engine.registry import Registry, Spec

QUANTIZATIONS = Registry("quantization")

ComputeDtype = Literal["float32", "bfloat16", "float16"]


class NoQuantSpec(Spec):
    pass


class FourBitSpec(Spec):
    double_quant: bool = True
    """Quantize the quantization constants too (saves ~0.4 bit/param)."""
    compute_dtype: ComputeDtype = "bfloat16"
    """Dtype the de-quantized weights are multiplied in (bfloat16 on GPUs; float32 is exact on CPU)."""


class Int8Spec(Spec):
    threshold: float = Field(6.0, ge=0)
    """LLM.int8() outlier threshold: activations above it are multiplied in 16-bit."""


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
    """4-bit NormalFloat (QLoRA): levels placed for normally distributed weights."""
    return _four_bit(spec, "nf4")


@QUANTIZATIONS.register("fp4", FourBitSpec)
def build_fp4(spec: FourBitSpec):
    """4-bit float: same size as nf4, usually a little less accurate for LLM weights."""
    return _four_bit(spec, "fp4")


@QUANTIZATIONS.register("int8", Int8Spec)
def build_int8(spec: Int8Spec):
    """8-bit LLM.int8(): half the memory of bf16, closer to full precision than 4-bit."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=spec.threshold)
