"""Attention over packed rows, one causal block per example (``sdpa_segments``).

Why: a packed row holds several examples; they must not attend to each other. A 4D
block-diagonal mask does that, but with a mask PyTorch's SDPA falls back to its generic
path: it materialises [batch, heads, T, T] scores for every layer and computes all of
them, including the cross-example blocks that the mask then throws away (at T=512 with
~80-token examples that is ~6x the useful attention work, and gigabytes of saved
activations). Here each example's span gets its own causal SDPA call instead: no mask
tensor, only the diagonal blocks computed, and the fused causal kernel used.

Registered with transformers' AttentionInterface under ``sdpa_segments``; a model set to
it behaves exactly like ``sdpa`` unless the forward call carries ``segment_lengths``
([rows, max segments] token counts per example, 0 = none; padding after the last one),
which engine/data/collate.py's packed_collate writes and the trainer passes through.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NAME = "sdpa_segments"
_registered = False


def register() -> None:
    """Make ``sdpa_segments`` known to transformers (attention + the sdpa mask builder)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, segment_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    _registered = True


def segment_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, segment_lengths=None, **kwargs):
    """Causal SDPA per packed example; plain ``sdpa`` when the call has no ``segment_lengths``.

    query [B, H, T, D], key/value [B, Hkv, T, D] -> ([B, T, H, D], None), like transformers' sdpa.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if segment_lengths is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    # Grouped-query attention (one K/V head per group of query heads): SDPA's enable_gqa
    # reads the shared heads directly, no repeated K/V copies (~5% less attention time here).
    gqa = query.shape[1] != key.shape[1]
    t = query.shape[2]
    rows = []
    for b, lengths in enumerate(segment_lengths.tolist()):
        sizes = [n for n in lengths if n > 0]
        pad = t - sum(sizes)
        # split (not slicing): its backward writes every piece's gradient into one buffer.
        pieces = [x[b : b + 1].split(sizes + ([pad] if pad else []), dim=2) for x in (query, key, value)]
        # Each output is [1, H, n, D]; joined along tokens of its [1, n, H, D] view, the result
        # is already the [1, T, H, D] layout returned: one copy instead of cat + transpose.
        parts = [
            F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=scaling, enable_gqa=gqa).transpose(
                1, 2
            )
            for q, k, v in zip(*(p[: len(sizes)] for p in pieces), strict=True)
        ]
        if pad:  # padding after the last example: its output is never used (labels -100)
            parts.append(query.new_zeros(1, pad, query.shape[1], value.shape[-1]))
        rows.append(torch.cat(parts, dim=1) if len(parts) > 1 else parts[0].contiguous())
    out = torch.cat(rows, dim=0) if len(rows) > 1 else rows[0]
    return out, None


def use_segments(model) -> bool:
    """Switch an ``sdpa`` model to ``sdpa_segments`` (returns whether the model now uses it).

    Models on another implementation (eager, flash-attention) keep it; packing then uses
    the 4D block-diagonal mask, which every implementation understands.
    """
    config = getattr(model, "config", None)
    current = getattr(config, "_attn_implementation", None)
    if current == NAME:
        return True
    if current != "sdpa" or not hasattr(model, "set_attn_implementation"):
        return False
    register()
    model.set_attn_implementation(NAME)
    return model.config._attn_implementation == NAME


def restore_sdpa(model) -> None:
    """Back to plain ``sdpa`` (generation and saved configs never see ``sdpa_segments``)."""
    if getattr(getattr(model, "config", None), "_attn_implementation", None) == NAME:
        model.set_attn_implementation("sdpa")


def check_segments() -> None:
    """Raise ``CheckFailed`` unless ``segment_attention`` on a packed row equals causal SDPA run
    on each example alone (output and q/k/v gradients), with grouped K/V heads and padding,
    and transformers accepts the registration (``register``)."""
    from engine.speed.guard import assert_close

    register()
    sizes, pad = [2, 3], 1
    q = torch.randn(1, 4, 6, 8, requires_grad=True)
    k = torch.randn(1, 2, 6, 8, requires_grad=True)
    v = torch.randn(1, 2, 6, 8, requires_grad=True)
    out, _ = segment_attention(None, q, k, v, None, scaling=8**-0.5, segment_lengths=torch.tensor([sizes + [0]]))
    want, start = [], 0
    for n in sizes:
        part = slice(start, start + n)
        kk, vv = (t[:, :, part].repeat_interleave(2, dim=1) for t in (k, v))
        want.append(F.scaled_dot_product_attention(q[:, :, part], kk, vv, is_causal=True, scale=8**-0.5).transpose(1, 2))
        start += n
    want = torch.cat(want, dim=1)
    assert_close("packed attention output", out[:, : sum(sizes)], want)
    if out.shape[1] != sum(sizes) + pad:
        raise AssertionError(f"packed attention returned {out.shape[1]} positions, not {sum(sizes) + pad}")
    g = torch.randn_like(want)
    got_grads = torch.autograd.grad(out[:, : sum(sizes)], (q, k, v), g)
    want_grads = torch.autograd.grad(want, (q, k, v), g)
    for name, a, b in zip("qkv", got_grads, want_grads, strict=True):
        assert_close(f"packed attention {name} gradient", a, b)
