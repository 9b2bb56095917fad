"""The speed switches of one training run, entered together, checked, recorded and undone together.

Why one place: each switch patches the model or the process (a norm class, a module-level
rotary function, an attention implementation, compiled modules, glibc's heap, PEFT's LoRA
layers). Entered in one context manager, every one of them is undone on exit, on success or
error alike, so the model that goes on to evaluation, export or the next adapter level is the
model that came in. Each switch has an off switch in the config, its measurements in
bench/RESULTS.md, and a self-check (engine/speed/guard.py): a switch whose check fails is
skipped with one line and the run goes on with the stock code. ``Applied.switches`` records
what happened to every switch; the trainer writes it to the log, metrics.json and the report.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

from torch import nn

from engine.speed.attention import check_segments, restore_sdpa, use_segments
from engine.speed.dropout import check_gap_dropout, use_gap_dropout
from engine.speed.fused_ops import (
    check_rms_norm,
    check_rope,
    fused_rope,
    norm_classes,
    restore_rms_norm,
    rope_functions,
    use_fused_rms_norm,
)
from engine.speed.guard import NotApplicable, Switches, assert_close, attempt, passing
from engine.speed.memory import HUGE_PAGES_TUNABLE
from engine.speed.memory import keep_freed_memory as _keep_freed_memory

LORA_SWITCHES_ATTR = "_engine_lora_switches"
"""Where ``lora_speedups`` leaves its record on the model, for ``speedups`` to report."""


@dataclass
class Applied:
    """What took effect (a switch may not apply: wrong device, attention implementation, OS,
    or a failed self-check)."""

    segments: bool = False
    """Packed rows attend per example through ``sdpa_segments`` (the collator must write segment lengths)."""
    fused_norms: int = 0
    fused_rope: int = 0
    compiled: int = 0
    kept_freed_memory: bool = False
    switches: Switches = field(default_factory=Switches)
    """Every switch by name: on / off (why) / skipped: why."""


@contextlib.contextmanager
def speedups(
    model: nn.Module,
    *,
    device_type: str,
    packing: bool,
    keep_freed_memory: bool,
    fused_ops: bool,
    compile: bool,
    mixed_precision: str = "no",
) -> Iterator[Applied]:
    """While open: per-example attention for packed rows, and on a CPU the heap tuning and the
    fused RMSNorm and rotary nodes; torch.compile of the decoder blocks if asked.

    All are undone on exit except the heap tuning, which is process-wide and has no saved
    value to return to (glibc's thresholds are dynamic until set); it only keeps freed memory
    for reuse, which helps whatever runs next in this process too.

    The fused nodes are fp32-only: under ``mixed_precision`` bf16/fp16 autocast every call takes
    the stock path, so they are reported off with that reason rather than on.
    """
    applied = Applied()
    sw = applied.switches
    on_cpu = device_type == "cpu"
    with contextlib.ExitStack() as undo:
        undo.callback(restore_sdpa, model)
        if packing:
            applied.segments = bool(attempt(sw, "sdpa_segments", check_segments, lambda: _segments(model)))
            if applied.segments:
                sw.on("sdpa_segments")
        else:
            sw.off("sdpa_segments", "no packing")
        if not keep_freed_memory:
            sw.off("keep_freed_memory", "train.keep_freed_memory=false")
        elif not on_cpu:
            sw.off("keep_freed_memory", f"for CPU training, not {device_type}")
        else:
            applied.kept_freed_memory = bool(attempt(sw, "keep_freed_memory", _nothing, _keep_freed_memory))
            if applied.kept_freed_memory:
                sw.on("keep_freed_memory")
            elif "keep_freed_memory" not in sw.status:
                sw.off("keep_freed_memory", "no glibc mallopt here")
        if not fused_ops:
            sw.off("fused_norms", "train.fused_ops=false")
            sw.off("fused_rope", "train.fused_ops=false")
        elif not on_cpu:
            sw.off("fused_norms", f"for CPU training, not {device_type}")
            sw.off("fused_rope", f"for CPU training, not {device_type}")
        else:
            undo.callback(restore_rms_norm, model)
            applied.fused_norms = _fuse_norms(model, sw)
            applied.fused_rope = _fuse_rope(model, sw, undo)
        if compile:
            undo.callback(uncompile_blocks, model)
            applied.compiled = attempt(sw, "compile", _nothing, lambda: _compile_checked(model)) or 0
            if applied.compiled:
                sw.on("compile", f"{applied.compiled} modules")
        else:
            sw.off("compile", "train.compile=false")
        _lora_status(model, sw)
        if mixed_precision not in ("no", None):
            for name in ("fused_norms", "fused_rope", "fused_lora"):
                if sw.active(name):
                    sw.off(name, f"{mixed_precision} autocast: the fused nodes are fp32-only, the stock code runs")
        _huge_pages_status(sw)
        yield applied


def _nothing() -> None:
    """The check of a switch that has nothing to compare (it changes no numbers)."""


def _segments(model: nn.Module) -> bool:
    if not use_segments(model):
        raise NotApplicable(f"attention is {getattr(model.config, '_attn_implementation', '?')}, not sdpa: the 4D mask is used")
    return True


def _fuse_norms(model: nn.Module, sw: Switches) -> int:
    """Swap the norm classes that pass their check; one skip line per class that does not."""
    classes = norm_classes(model)
    if not classes:
        sw.off("fused_norms", "no Llama-style RMSNorm in this model")
        return 0
    ok = passing(sw, "fused_norms", classes, check_rms_norm)
    n = use_fused_rms_norm(model, set(ok)) if ok else 0
    if n:
        sw.on("fused_norms", f"{n} norms")
    return n


def _fuse_rope(model: nn.Module, sw: Switches, undo: contextlib.ExitStack) -> int:
    functions = rope_functions(model)
    if not functions:
        sw.off("fused_rope", "no module-level apply_rotary_pos_emb in this model's attention")
        return 0
    ok = passing(sw, "fused_rope", functions, check_rope)
    n = undo.enter_context(fused_rope(model, ok)) if ok else 0
    if n:
        sw.on("fused_rope", f"{n} modeling modules")
    return n


def _lora_status(model: nn.Module, sw: Switches) -> None:
    """Report what ``lora_speedups`` did when the adapter was built (it runs before training)."""
    recorded = getattr(model, LORA_SWITCHES_ATTR, None)
    if recorded is None:
        sw.off("gap_dropout", "no LoRA layers")
        sw.off("fused_lora", "no LoRA layers")
        return
    sw.status.update(recorded)


def _huge_pages_status(sw: Switches) -> None:
    if HUGE_PAGES_TUNABLE in os.environ.get("GLIBC_TUNABLES", ""):
        sw.on("huge_pages")
    else:
        sw.off("huge_pages", "not started through the engine command, ENGINE_HUGE_PAGES=0, or the kernel has no madvise THP")


def lora_speedups(model: nn.Module, *, fused: bool) -> Switches:
    """On a freshly built LoRA model: sparse dropout (``GapDropout``) and, if ``fused``, one
    autograd node per LoRA layer, each after its self-check. The record is kept on the model
    for the trainer's report. Returns it."""
    from engine.speed.fused_lora import check_fused_lora, lora_layers, use_fused_lora

    sw = Switches()
    previous = getattr(model, LORA_SWITCHES_ATTR, None)
    if previous is not None:  # a later level of a layered adapter: the same decisions for its new layers
        sw.status.update(previous)
        if sw.active("gap_dropout"):
            use_gap_dropout(model)
        if fused and sw.active("fused_lora"):
            use_fused_lora(model)
        return sw
    layers = lora_layers(model)
    if not layers:
        sw.off("gap_dropout", "no LoRA layers")
        sw.off("fused_lora", "no LoRA layers")
    else:
        swapped = attempt(sw, "gap_dropout", check_gap_dropout, lambda: use_gap_dropout(model))
        if swapped:
            sw.on("gap_dropout", f"{swapped} dropouts")
        elif "gap_dropout" not in sw.status:
            sw.off("gap_dropout", "no LoRA dropout above 0")
        if not fused:
            sw.off("fused_lora", "adapter.fused=false")
        else:
            n = attempt(sw, "fused_lora", lambda: check_fused_lora(layers[0]), lambda: use_fused_lora(model))
            if n:
                sw.on("fused_lora", f"{n} layers")
    setattr(model, LORA_SWITCHES_ATTR, dict(sw.status))
    return sw


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


def _compile_checked(model: nn.Module) -> int:
    """``compile_blocks``, then one compiled module against its eager forward (compilation is
    lazy: a missing compiler or an unsupported op only shows at the first call). Undone when
    the check fails."""
    n = compile_blocks(model)
    try:
        check_compiled(model)
    except Exception:
        uncompile_blocks(model)
        raise
    return n


def check_compiled(model: nn.Module) -> None:
    """Raise unless the first compiled module gives its eager forward's output and input gradient."""
    import torch

    module = next((m for m in model.modules() if _compilable(m) and getattr(m, "_compiled_call_impl", None)), None)
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    if module is None or hidden is None:
        raise NotApplicable("no MLP or RMSNorm module to compile")
    p = next(module.parameters())
    x = torch.randn(1, 4, hidden, dtype=p.dtype, device=p.device, requires_grad=True)
    want = module.forward(x)
    (want_dx,) = torch.autograd.grad(want.sum(), x)
    got = module(x)
    (got_dx,) = torch.autograd.grad(got.sum(), x)
    assert_close("compiled output", got, want, rtol=1e-3, atol=1e-4)
    assert_close("compiled input gradient", got_dx, want_dx, rtol=1e-3, atol=1e-4)


def uncompile_blocks(model: nn.Module) -> None:
    """Back to eager modules (``nn.Module.compile`` keeps its compiled call in one attribute)."""
    for module in model.modules():
        if _compilable(module):
            module._compiled_call_impl = None


def _compilable(module: nn.Module) -> bool:
    return type(module).__name__.endswith(("MLP", "RMSNorm")) and hasattr(module, "compile")
