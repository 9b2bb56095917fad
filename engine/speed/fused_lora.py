"""A LoRA linear layer computed in one autograd node: fewer passes over activations on CPU.

Why: PEFT computes ``base(x) + lora_B(lora_A(dropout(x))) * scaling`` as six autograd ops.
Each of the scale, add and dropout steps reads and writes a full activation tensor, in the
forward and again in the backward pass, and the dropout output is kept alive until backward.
On a memory-bound 2-core CPU those passes cost as much as a tenth of a SmolLM2 LoRA step.

Here the same function is one node:

    forward   out = x W^T + b;  h = drop(x) A^T;  out += (scaling / (1 - p)) * h B^T   (addmm)
    backward  gh = (scaling / (1 - p)) * g B;  dB = (scaling / (1 - p)) * g^T h;  dA = gh^T drop(x)
              dx = drop(gh A) + g W   (the second GEMM accumulates into the first)

``drop`` zeroes the positions ``engine.speed.dropout.drop_positions`` draws from torch's global
generator, exactly as ``GapDropout`` does in the same place, so a fused run consumes the same
random numbers and trains the same model as an unfused one (equal up to float rounding);
the dropped input is recomputed in backward rather than stored.

Only the common case is fused: one active vanilla LoRA adapter on a frozen ``nn.Linear``, in
training, on CPU, without autocast. Everything else (DoRA, several active adapters, merged
weights, quantized bases, CUDA, inference) falls through to PEFT's own forward, and the
adapter files are PEFT's, unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from torch import nn

from engine.speed.dropout import drop_positions, dropped, zero_at


def _dropped(x2d: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
    """``x2d`` with the flat positions ``idx`` zeroed (a copy), or ``x2d`` itself if none."""
    return x2d if idx is None else dropped(x2d, idx)


class _LoraLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling: float, p: float):
        x2d = x.reshape(-1, x.shape[-1])
        out = F.linear(x2d, weight, bias)
        idx = drop_positions(x2d.numel(), p, x.device) if p > 0 else None
        h = _dropped(x2d, idx) @ lora_a.t()
        alpha = scaling / (1.0 - p)
        out.addmm_(h, lora_b.t(), alpha=alpha)
        ctx.save_for_backward(x2d, idx, h, weight, lora_a, lora_b)
        ctx.alpha = alpha
        ctx.x_shape = x.shape
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        x2d, idx, h, weight, lora_a, lora_b = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        gh = (g @ lora_b).mul_(ctx.alpha)
        grad_a = grad_b = grad_x = None
        if ctx.needs_input_grad[4]:
            grad_b = (g.t() @ h).mul_(ctx.alpha)
        if ctx.needs_input_grad[3]:
            grad_a = gh.t() @ _dropped(x2d, idx)
        if ctx.needs_input_grad[0]:
            grad_x = gh @ lora_a
            if idx is not None:
                zero_at(grad_x, idx)
            grad_x.addmm_(g, weight)
            grad_x = grad_x.view(ctx.x_shape)
        return grad_x, None, None, grad_a, grad_b, None, None


class FusedLoraLinear(PeftLoraLinear):
    """PEFT's LoRA ``Linear`` whose training forward on CPU is one fused autograd node."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        name = self._fusable(x, args, kwargs)
        if name is None:
            return super().forward(x, *args, **kwargs)
        base = self.base_layer
        drop = self.lora_dropout[name]
        p = drop.p if isinstance(drop, nn.Dropout) else 0.0
        return _LoraLinearFn.apply(
            x, base.weight, base.bias, self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name], p
        )

    def _fusable(self, x: torch.Tensor, args, kwargs) -> str | None:
        """The one active adapter's name when the fused path computes exactly PEFT's result."""
        if args or kwargs or not self.training or self.disable_adapters or self.merged:
            return None
        if x.device.type != "cpu" or torch.is_autocast_enabled("cpu") or not torch.is_grad_enabled():
            return None
        active = [a for a in self.active_adapters if a in self.lora_A]
        if len(active) != 1 or active[0] in self.lora_variant:
            return None
        name = active[0]
        base, a, b = self.base_layer, self.lora_A[name], self.lora_B[name]
        drop = self.lora_dropout[name]
        if type(base) is not nn.Linear or base.weight.requires_grad:
            return None
        if base.bias is not None and base.bias.requires_grad:
            return None
        if a.bias is not None or b.bias is not None:
            return None
        if not (x.dtype == a.weight.dtype == b.weight.dtype == base.weight.dtype):
            return None
        if not isinstance(drop, (nn.Dropout, nn.Identity)) or getattr(drop, "inplace", False):
            return None
        return name


def use_fused_lora(model) -> int:
    """Make every PEFT LoRA ``Linear`` in ``model`` a ``FusedLoraLinear``; returns how many."""
    n = 0
    for module in model.modules():
        if type(module) is PeftLoraLinear:
            module.__class__ = FusedLoraLinear
            n += 1
    return n


def check_fused_lora(module: PeftLoraLinear) -> None:
    """Raise ``CheckFailed`` unless the fused node computes what PEFT's own forward computes on
    ``module``: output and the gradients of the input, A and B, with the module's dropout drawn
    from the same seed. B is set to random values for the check (PEFT initialises it to zero,
    which would hide A's gradient) and put back after; the module's mode is restored too."""
    from engine.speed.guard import NotApplicable, assert_close

    was_training, cls = module.training, type(module)
    module.train()
    try:
        dtype = module.base_layer.weight.dtype
        if module.base_layer.weight.device.type != "cpu":
            raise NotApplicable("the fused node is for CPU training")
        name = FusedLoraLinear._fusable(module, torch.randn(1, module.in_features, dtype=dtype), (), {})
        if name is None:
            raise NotApplicable("these LoRA layers are not the fused case: fp32, one plain adapter, frozen nn.Linear")
        a, b = module.lora_A[name].weight, module.lora_B[name].weight
        saved = b.detach().clone()
        try:
            with torch.no_grad():
                b.normal_(0, 0.5)
            x = torch.randn(2, 3, module.in_features, dtype=dtype, requires_grad=True)
            g = torch.randn(2, 3, module.out_features, dtype=dtype)
            results = []
            for kind in (PeftLoraLinear, FusedLoraLinear):
                module.__class__ = kind
                torch.manual_seed(1234)
                out = module(x)
                results.append((out, *torch.autograd.grad(out, (x, a, b), g)))
        finally:
            with torch.no_grad():
                b.copy_(saved)
    finally:
        module.train(was_training)
        module.__class__ = cls
    for what, got, want in zip(("output", "input gradient", "A gradient", "B gradient"), *results[::-1], strict=True):
        assert_close(f"LoRA {what}", got, want)


def lora_layers(model) -> list[PeftLoraLinear]:
    """PEFT's plain LoRA ``Linear`` layers of ``model`` (the candidates for ``use_fused_lora``)."""
    return [m for m in model.modules() if type(m) is PeftLoraLinear]
