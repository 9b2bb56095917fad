"""Device and precision through HF accelerate (CUDA, then MPS, then CPU; DDP/FSDP by launch).

Precision ``auto`` picks the fastest *safe* choice the hardware has natively: bf16 on
Ampere+ GPUs and on CPUs with AVX512-BF16/AMX (about 2x fp32 speed measured on such a
CPU), else fp32 (fp16 is only used when asked: it needs loss scaling).
"""

from __future__ import annotations

import warnings
from functools import lru_cache


@lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_device(device: str) -> str:
    import torch

    if device != "auto":
        return device
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def resolve_precision(precision: str, device: str) -> str:
    """Return accelerate's mixed_precision value: 'no', 'bf16' or 'fp16'."""
    import torch

    if precision == "auto":
        if device == "cuda" and torch.cuda.is_bf16_supported():
            return "bf16"
        if device == "cpu" and cpu_has_native_bf16():
            return "bf16"
        return "no"
    if precision == "fp32":
        return "no"
    supported = {
        "cuda": {"bf16": torch.cuda.is_available() and torch.cuda.is_bf16_supported(), "fp16": True},
        "cpu": {"bf16": True, "fp16": False},
        "mps": {"bf16": False, "fp16": True},
    }[device]
    if not supported.get(precision, False):
        warnings.warn(f"precision={precision} is not supported on {device}; falling back to fp32", stacklevel=2)
        return "no"
    return precision


def make_accelerator(device: str, precision: str, grad_accum: int = 1):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    dev = resolve_device(device)
    mp = resolve_precision(precision, dev)
    # accelerate keeps one process-wide state; a second run in the same process (a Hydra
    # multirun job, a test) may ask for another precision. Reset that state, but keep the
    # process group (PartialState) that a distributed launch set up.
    AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(cpu=dev == "cpu", mixed_precision=mp, gradient_accumulation_steps=grad_accum)
