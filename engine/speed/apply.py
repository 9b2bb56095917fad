"""The speed switches of one training run, entered together and undone together.

Why one place: each switch patches the model or the process (a norm class, a module-level
rotary function, an attention implementation, compiled modules, glibc's heap). Entered in one
context manager, every one of them is undone on exit, on success or error alike, so the model
that goes on to evaluation, export or the next adapter level is the model that came in.
Each switch has an off switch in the ``train`` config and its measurements in bench/RESULTS.md.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

from torch import nn

from engine.speed.attention import restore_sdpa, use_segments
from engine.speed.fused_ops import fused_rope, restore_rms_norm, use_fused_rms_norm
from engine.speed.memory import keep_freed_memory as _keep_freed_memory


@dataclass
class Applied:
    """What took effect (a switch may not apply: wrong device, attention implementation, OS)."""

    segments: bool = False
    """Packed rows attend per example through ``sdpa_segments`` (the collator must write segment lengths)."""
    fused_norms: int = 0
    fused_rope: int = 0
    compiled: int = 0
    kept_freed_memory: bool = False


@contextlib.contextmanager
def speedups(
    model: nn.Module, *, device_type: str, packing: bool, keep_freed_memory: bool, fused_ops: bool, compile: bool
) -> Iterator[Applied]:
    """While open: per-example attention for packed rows, and on a CPU the heap tuning and the
    fused RMSNorm and rotary nodes; torch.compile of the decoder blocks if asked.

    All are undone on exit except the heap tuning, which is process-wide and has no saved
    value to return to (glibc's thresholds are dynamic until set); it only keeps freed memory
    for reuse, which helps whatever runs next in this process too.
    """
    applied = Applied()
    on_cpu = device_type == "cpu"
    with contextlib.ExitStack() as undo:
        undo.callback(restore_sdpa, model)
        applied.segments = bool(packing) and use_segments(model)
        if keep_freed_memory and on_cpu:
            applied.kept_freed_memory = _keep_freed_memory()
        if fused_ops and on_cpu:
            undo.callback(restore_rms_norm, model)
            applied.fused_norms = use_fused_rms_norm(model)
            applied.fused_rope = undo.enter_context(fused_rope(model))
        if compile:
            undo.callback(uncompile_blocks, model)
            applied.compiled = compile_blocks(model)
        yield applied


def compile_blocks(model: nn.Module) -> int:
    """torch.compile the MLP and norm modules of every decoder block (returns how many).

    Regional, not whole-model: attention (its per-example loop over packed rows, its masks)
    stays eager, and the MLP/norm graphs are the same for every layer, so they compile once
    and are reused (parameters are graph inputs). Shapes vary with batch lengths: dynamic.
    """
    n = 0
    for module in model.modules():
        if _compilable(module):
            module.compile(dynamic=True)
            n += 1
    return n


def uncompile_blocks(model: nn.Module) -> None:
    """Back to eager modules (``nn.Module.compile`` keeps its compiled call in one attribute)."""
    for module in model.modules():
        if _compilable(module):
            module._compiled_call_impl = None


def _compilable(module: nn.Module) -> bool:
    return type(module).__name__.endswith(("MLP", "RMSNorm")) and hasattr(module, "compile")
