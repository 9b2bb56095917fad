"""RMSNorm and rotary embeddings as single autograd nodes: the same functions, fewer passes.

Why: transformers' Llama-family RMSNorm is written as five elementwise ops (square, mean,
rsqrt, scale, weight). Autograd keeps the inputs of each and its backward walks the
[tokens, hidden] activation about ten times. A SmolLM2 step runs 61 norms; on a 2-core CPU a
norm's forward + backward took 10.5-14.5 ms that way and 2.9-3.8 ms here (same inputs,
[2048, 576] fp32, results equal to 1e-6), about 5% of a packed LoRA step.

    forward   r = 1 / sqrt(mean(x^2) + eps)         (one reduction, no x^2 tensor)
              y = (x * r) * w                       (HF's order of operations)
    backward  gw = g * w
              dx = r * gw - x * r^3 * mean(gw * x)  (in place on gw)

Only frozen norm weights (LoRA, QLoRA: the norms are not trained) in fp32 on a CPU without
autocast take this path; anything else runs the model's own forward. The classes swapped are
those named Llama-like below that also pass ``check_rms_norm``: on a small input, the class's
own forward and the fused node agree, forward and backward (engine/speed/guard.py).

Rotary embeddings likewise: transformers' ``apply_rotary_pos_emb`` (x * cos + rotate_half(x)
* sin) builds a negated half, a concatenation, two products and a sum, forward and backward;
``_RopeFn`` writes x * cos once and adds the rotated half in place (3.0 vs 6.5 ms per layer
here). It is a module-level function that the attention code looks up when called, so
``fused_rope(model)`` points the model's modeling module at the fused one for the duration
of training and restores it after. Each modeling module's own function (a plain function or,
since transformers 5.25, a callable object) is first checked against ``_RopeFn`` on a small
input (``check_rope``); one that computes anything else is left alone.
"""

from __future__ import annotations

import contextlib
import copy
import sys

import torch
from torch import nn

from engine.speed.guard import CheckFailed, Switches, assert_close, passing

# RMSNorm classes whose forward is Llama's: weight * (x * rsqrt(mean(x^2) + eps)) in fp32.
# (Gemma's uses 1 + weight and is not here.)
SAME_AS_LLAMA = ("LlamaRMSNorm", "MistralRMSNorm", "MixtralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "Phi3RMSNorm")


class _RMSNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps: float):
        h = x.shape[-1]
        r = torch.linalg.vector_norm(x, 2, dim=-1, keepdim=True).square_().div_(h).add_(eps).rsqrt_()
        ctx.save_for_backward(x, weight, r)
        return torch.mul(x, r).mul_(weight)

    @staticmethod
    def backward(ctx, grad):
        x, weight, r = ctx.saved_tensors
        gw = grad * weight
        coef = (gw * x).sum(dim=-1, keepdim=True).mul_(r.pow(3)).div_(-x.shape[-1])
        return gw.mul_(r).addcmul_(x, coef), None, None


def _cpu_fp32(*tensors: torch.Tensor) -> bool:
    """The case the hand-written nodes here are measured and tested for: every tensor fp32 on
    the CPU, autocast off (anything else runs transformers' own code)."""
    return not torch.is_autocast_enabled("cpu") and all(t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors)


def _forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    w = self.weight
    if w.requires_grad or not _cpu_fp32(hidden_states, w):
        return super(type(self), self).forward(hidden_states)
    return _RMSNormFn.apply(hidden_states, w, self.variance_epsilon)


_FUSED: dict[type, type] = {}


def fused_class(cls: type) -> type:
    """``cls`` with the fused forward (one subclass per original class, made once)."""
    if cls not in _FUSED:
        _FUSED[cls] = type(f"Fused{cls.__name__}", (cls,), {"forward": _forward, "__doc__": __doc__})
    return _FUSED[cls]


def norm_classes(model: nn.Module) -> dict[type, nn.Module]:
    """Llama-like RMSNorm classes in ``model`` -> one instance of each (candidates for the swap)."""
    found: dict[type, nn.Module] = {}
    for module in model.modules():
        cls = type(module)
        if cls.__name__ in SAME_AS_LLAMA and hasattr(module, "variance_epsilon") and cls not in found:
            found[cls] = module
    return found


def check_rms_norm(module: nn.Module) -> None:
    """Raise ``CheckFailed`` unless ``module``'s class computes what ``_RMSNormFn`` computes:
    its own forward vs the fused node on a small fp32 input, output and input gradient."""
    ref = copy.deepcopy(module).float().requires_grad_(False)
    hidden = ref.weight.shape[-1]
    x = (torch.randn(2, 3, hidden) * 3).requires_grad_()
    g = torch.randn(2, 3, hidden)
    want = type(module).forward(ref, x)
    (want_dx,) = torch.autograd.grad(want, x, g)
    got = _RMSNormFn.apply(x, ref.weight, ref.variance_epsilon)
    (got_dx,) = torch.autograd.grad(got, x, g)
    assert_close(f"{type(module).__name__} output", got, want)
    assert_close(f"{type(module).__name__} input gradient", got_dx, want_dx)


def use_fused_rms_norm(model: nn.Module, classes: set[type] | None = None) -> int:
    """Swap every Llama-style RMSNorm in ``model`` (of ``classes``, default all candidates)
    to its fused subclass; returns how many."""
    allowed = set(norm_classes(model)) if classes is None else classes
    n = 0
    for module in model.modules():
        cls = type(module)
        if cls in allowed and hasattr(module, "variance_epsilon"):
            module.__class__ = fused_class(cls)
            n += 1
    return n


def restore_rms_norm(model: nn.Module) -> int:
    """Undo ``use_fused_rms_norm``: every fused norm gets its original class back; returns how many."""
    originals = {fused: cls for cls, fused in _FUSED.items()}
    n = 0
    for module in model.modules():
        cls = originals.get(type(module))
        if cls is not None:
            module.__class__ = cls
            n += 1
    return n


class _RopeFn(torch.autograd.Function):
    """x * cos + rotate_half(x) * sin, with rotate_half(x) = cat(-x[..., h:], x[..., :h])."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        h = x.shape[-1] // 2
        out = x * cos
        out[..., :h].addcmul_(x[..., h:], sin[..., :h], value=-1)
        out[..., h:].addcmul_(x[..., :h], sin[..., h:])
        ctx.save_for_backward(cos, sin)
        return out

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        h = grad.shape[-1] // 2
        dx = grad * cos
        dx[..., h:].addcmul_(grad[..., :h], sin[..., :h], value=-1)
        dx[..., :h].addcmul_(grad[..., h:], sin[..., h:])
        return dx, None, None


def _fused_apply_rotary(original):
    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        # Llama's attention passes exactly (q, k, cos, sin); anything else goes to the original.
        if (
            args
            or set(kwargs) - {"unsqueeze_dim"}
            or cos.requires_grad
            or sin.requires_grad
            or q.shape[-1] % 2
            or not _cpu_fp32(q, k, cos, sin)
        ):
            return original(q, k, cos, sin, *args, **kwargs)
        dim = kwargs.get("unsqueeze_dim", 1)
        cos, sin = cos.unsqueeze(dim), sin.unsqueeze(dim)
        return _RopeFn.apply(q, cos, sin), _RopeFn.apply(k, cos, sin)

    apply_rotary_pos_emb.original = original
    return apply_rotary_pos_emb


def rope_functions(model: nn.Module) -> dict[object, object]:
    """Modeling modules of ``model``'s attention layers -> their ``apply_rotary_pos_emb``
    (whatever object it is), for those not already patched."""
    found = {}
    for name in sorted({type(m).__module__ for m in model.modules() if type(m).__name__.endswith("Attention")}):
        module = sys.modules.get(name)
        fn = getattr(module, "apply_rotary_pos_emb", None)
        if fn is not None and not hasattr(fn, "original"):
            found[module] = fn
    return found


def check_rope(fn) -> None:
    """Raise ``CheckFailed`` unless ``fn(q, k, cos, sin)`` computes Llama's rotary embedding as
    ``_RopeFn`` does: both outputs and the gradients of q and k, on a small input shaped as in
    attention ([B, H, T, D] views; cos/sin [B, T, D]; grouped K/V heads)."""
    if not callable(fn):
        raise CheckFailed(f"apply_rotary_pos_emb is a {type(fn).__name__}, not callable")
    q = torch.randn(1, 5, 4, 8).transpose(1, 2).requires_grad_()
    k = torch.randn(1, 5, 2, 8).transpose(1, 2).requires_grad_()
    angle = torch.arange(5.0)[:, None] * torch.rand(4).repeat(2)[None, :]
    cos, sin = angle.cos()[None], angle.sin()[None]
    gq, gk = torch.randn(1, 4, 5, 8), torch.randn(1, 2, 5, 8)
    want = fn(q, k, cos, sin)
    if not isinstance(want, tuple | list) or len(want) != 2:
        raise CheckFailed(f"apply_rotary_pos_emb returned {type(want).__name__}, not (q, k)")
    want_grads = torch.autograd.grad(want, (q, k), (gq, gk))
    got = (_RopeFn.apply(q, cos[:, None], sin[:, None]), _RopeFn.apply(k, cos[:, None], sin[:, None]))
    got_grads = torch.autograd.grad(got, (q, k), (gq, gk))
    for what, a, b in zip(("q", "k", "q gradient", "k gradient"), (*got, *got_grads), (*want, *want_grads), strict=True):
        assert_close(f"rotary {what}", a, b, rtol=1e-5, atol=1e-5)


@contextlib.contextmanager
def fused_rope(model: nn.Module, modules: list | None = None):
    """While open, the given modeling modules (default: every one of ``model``'s attention
    layers whose rotary function passes ``check_rope``) apply rotary embeddings with ``_RopeFn``."""
    found = rope_functions(model)
    if modules is None:
        modules = passing(Switches(quiet=True), "fused_rope", found, check_rope)
    patched = []
    for module in modules:
        fn = found.get(module)
        if fn is not None:
            module.apply_rotary_pos_emb = _fused_apply_rotary(fn)
            patched.append((module, fn))
    try:
        yield len(patched)
    finally:
        for module, fn in patched:
            module.apply_rotary_pos_emb = fn
