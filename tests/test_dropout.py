"""GapDropout: nn.Dropout's distribution, drawn sparsely; gradients use the same mask."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from engine.speed.dropout import GapDropout, drop_positions, use_gap_dropout


def test_drop_positions_are_iid_bernoulli():
    torch.manual_seed(0)
    n, p, draws = 400, 0.1, 3000
    counts = torch.zeros(n)
    per_draw = []
    for _ in range(draws):
        idx = drop_positions(n, p)
        assert torch.all(idx[1:] > idx[:-1]) and (idx.numel() == 0 or (idx[0] >= 0 and idx[-1] < n))
        counts[idx] += 1
        per_draw.append(idx.numel())
    freq = counts / draws
    # Every position dropped with probability p (binomial sd ~0.0055 per position here).
    assert freq.mean().item() == pytest.approx(p, abs=0.003)
    assert freq.min().item() > p - 0.03 and freq.max().item() < p + 0.03
    # Drops per draw ~ Binomial(n, p): mean np = 40, variance np(1-p) = 36.
    k = torch.tensor(per_draw, dtype=torch.float64)
    assert k.mean().item() == pytest.approx(n * p, rel=0.03)
    assert k.var().item() == pytest.approx(n * p * (1 - p), rel=0.15)
    # Neighbours are independent: P(both dropped) ~ p^2.
    both = sum(1 for _ in range(2000) if {5, 6} <= set(drop_positions(12, 0.3).tolist()))
    assert both / 2000 == pytest.approx(0.09, abs=0.02)


def test_forward_scales_kept_values_and_backward_uses_the_same_mask():
    torch.manual_seed(1)
    x = torch.randn(64, 96, requires_grad=True)
    d = GapDropout(0.2).train()
    y = d(x)
    kept = y != 0
    assert torch.allclose(y[kept], x[kept] / 0.8)
    (y * 3).sum().backward()
    assert torch.equal(x.grad != 0, kept) and torch.allclose(x.grad[kept], torch.full_like(x.grad[kept], 3 / 0.8))
    d.eval()
    assert torch.equal(d(x), x)


def test_same_seed_same_mask_and_lora_layers_are_swapped():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(2)
    x = torch.randn(8, 16)
    d = GapDropout(0.3).train()
    torch.manual_seed(3)
    a = d(x)
    torch.manual_seed(3)
    assert torch.equal(a, d(x))
    model = LlamaForCausalLM(
        LlamaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)
    )
    model = get_peft_model(model, LoraConfig(r=2, lora_dropout=0.1, target_modules=["q_proj", "v_proj"]))
    assert use_gap_dropout(model) == 4
    drops = [m for m in model.modules() if isinstance(m, nn.Dropout) and m.p == 0.1]
    assert drops and all(isinstance(m, GapDropout) for m in drops)
