"""FusedLoraLinear: PEFT's LoRA result and gradients, one autograd node, same random numbers."""

from __future__ import annotations

import copy

import pytest
import torch

from engine.speed.dropout import use_gap_dropout
from engine.speed.fused_lora import FusedLoraLinear, use_fused_lora


def _pair(dropout: float, **lora):
    """Two identical tiny Llama LoRA models: PEFT's forward (GapDropout) and the fused one."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64
        )
    )
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear", **lora)
    plain = get_peft_model(base, cfg)
    for name, p in plain.named_parameters():
        if "lora_B" in name:  # B starts at zero in PEFT; make the update non-trivial
            torch.nn.init.normal_(p, std=0.1)
    use_gap_dropout(plain)
    fused = copy.deepcopy(plain)
    return plain, fused, use_fused_lora(fused)


def _step(model, ids, seed):
    model.train()
    model.zero_grad()
    torch.manual_seed(seed)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_fused_equals_peft_forward_and_gradients(dropout):
    plain, fused, n = _pair(dropout)
    assert n == 2 * 7  # every projection of both layers
    ids = torch.randint(0, 96, (3, 20))
    loss_p, grads_p = _step(plain, ids, seed=5)
    loss_f, grads_f = _step(fused, ids, seed=5)
    # Same seed -> the fused node draws the same dropout positions as GapDropout did.
    assert loss_f.item() == pytest.approx(loss_p.item(), rel=1e-5)
    assert grads_p.keys() == grads_f.keys() and len(grads_p) == 2 * 7 * 2
    for name, g in grads_p.items():
        assert g.abs().sum() > 0, name
        torch.testing.assert_close(grads_f[name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_dropout_really_drops_and_differs_across_seeds():
    _, fused, _ = _pair(0.3)
    ids = torch.randint(0, 96, (2, 16))
    a, _ = _step(fused, ids, seed=1)
    b, _ = _step(fused, ids, seed=2)
    c, _ = _step(fused, ids, seed=1)
    assert a.item() != b.item() and a.item() == c.item()


def test_unfusable_cases_fall_back_to_peft():
    plain, fused, _ = _pair(0.3)
    layer = next(m for m in fused.modules() if isinstance(m, FusedLoraLinear))
    x = torch.randn(2, 5, layer.in_features)
    assert layer._fusable(x, (), {}) == "default"
    fused.eval()
    assert layer._fusable(x, (), {}) is None  # inference: PEFT's forward
    fused.train()
    with torch.no_grad():
        assert layer._fusable(x, (), {}) is None
    with fused.disable_adapter():
        assert layer._fusable(x, (), {}) is None
    assert layer._fusable(x.double(), (), {}) is None
    # Eval outputs are identical (the same PEFT code runs in both).
    ids = torch.randint(0, 96, (2, 12))
    plain.eval(), fused.eval()
    with torch.no_grad():
        torch.testing.assert_close(fused(input_ids=ids).logits, plain(input_ids=ids).logits)


def test_dora_is_not_fused_but_saved_adapters_match(tmp_path):
    _, fused, n = _pair(0.1, use_dora=True)
    layer = next(m for m in fused.modules() if isinstance(m, FusedLoraLinear))
    assert n == 14 and layer._fusable(torch.randn(2, 3, layer.in_features), (), {}) is None
    plain, fused, _ = _pair(0.1)
    plain.save_pretrained(tmp_path / "plain")
    fused.save_pretrained(tmp_path / "fused")
    from safetensors.torch import load_file

    a = load_file(tmp_path / "plain" / "adapter_model.safetensors")
    b = load_file(tmp_path / "fused" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
