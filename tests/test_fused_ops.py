"""engine.speed.fused_ops: the fused RMSNorm computes transformers' RMSNorm, forward and backward."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from engine.speed.fused_ops import SAME_AS_LLAMA, fused_class, fused_rope, use_fused_rms_norm


def _norm(hidden: int = 48, eps: float = 1e-5):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(0)
    norm = LlamaRMSNorm(hidden, eps=eps)
    norm.weight.data.normal_(1.0, 0.2)
    norm.weight.requires_grad_(False)
    return norm


def test_forward_and_input_gradient_match_the_original():
    ref = _norm()
    fused = _norm()
    assert use_fused_rms_norm(fused) == 1 and type(fused).__name__ == "FusedLlamaRMSNorm"
    x = (torch.randn(3, 17, 48) * 4).requires_grad_()
    g = torch.randn(3, 17, 48)
    y_ref = ref(x)
    (dx_ref,) = torch.autograd.grad(y_ref, x, g)
    y = fused(x)
    assert y.grad_fn is not None and "RMSNormFn" in type(y.grad_fn).__name__  # the fused node ran
    (dx,) = torch.autograd.grad(y, x, g)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-5, atol=1e-6)
    # A second-order check on the hand-written backward, in float64 through the same formula.
    from engine.speed.fused_ops import _RMSNormFn

    x64 = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    w64 = torch.randn(6, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t: _RMSNormFn.apply(t, w64, 1e-6), (x64,))


def test_trainable_weight_other_dtypes_and_autocast_use_the_original_forward():
    fused = _norm()
    use_fused_rms_norm(fused)
    x = torch.randn(2, 5, 48, requires_grad=True)
    fused.weight.requires_grad_(True)  # a trained norm needs its weight gradient: not fused
    y = fused(x)
    assert "RMSNormFn" not in type(y.grad_fn).__name__
    y.sum().backward()
    assert fused.weight.grad is not None
    fused.weight.requires_grad_(False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert "RMSNormFn" not in type(fused(x).grad_fn).__name__
    bf = fused.to(torch.bfloat16)
    assert "RMSNormFn" not in type(bf(x.to(torch.bfloat16)).grad_fn).__name__


def test_swapped_classes_compute_llamas_norm():
    """Each Llama-like class passes the numeric self-check the trainer runs before swapping it
    (its own forward vs the fused node, output and input gradient): not its source text."""
    from engine.speed.fused_ops import check_rms_norm

    checked = 0
    for name in SAME_AS_LLAMA:
        family = name.removesuffix("RMSNorm").lower()
        try:
            module = __import__(f"transformers.models.{family}.modeling_{family}", fromlist=[name])
        except ImportError:
            continue
        cls = getattr(module, name, None)
        if cls is None:
            continue
        norm = cls(24, eps=1e-6)
        norm.weight.data.normal_(1.0, 0.2)
        check_rms_norm(norm)
        checked += 1
    assert checked >= 3


def test_a_tiny_llama_trains_the_same_with_fused_norms_and_rope():
    def model():
        torch.manual_seed(0)
        cfg = LlamaConfig(
            vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
        )
        m = LlamaForCausalLM(cfg)
        for n, p in m.named_parameters():
            p.requires_grad_("q_proj" in n)  # a stand-in for LoRA: norms frozen
        return m

    from transformers.models.llama import modeling_llama

    ref, fused = model(), model()
    assert use_fused_rms_norm(fused) == 5  # 2 per layer + the final norm
    ids = torch.randint(0, 64, (2, 12))
    ref(input_ids=ids, labels=ids).loss.backward()
    original = modeling_llama.apply_rotary_pos_emb
    with fused_rope(fused) as patched:
        assert patched == 1 and modeling_llama.apply_rotary_pos_emb.original is original
        with fused_rope(fused) as again:  # nested: nothing patched twice
            assert again == 0
        fused(input_ids=ids, labels=ids).loss.backward()
    assert modeling_llama.apply_rotary_pos_emb is original  # restored
    for (n, a), (_, b) in zip(ref.named_parameters(), fused.named_parameters(), strict=True):
        if a.requires_grad:
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=n)
    assert fused_class(type(ref.model.norm)) is type(fused.model.norm)


def test_fused_rope_matches_transformers_and_its_gradient():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from engine.speed.fused_ops import _fused_apply_rotary

    torch.manual_seed(0)
    q = torch.randn(2, 17, 4, 16).transpose(1, 2).requires_grad_()  # [B, H, T, D] views, as in attention
    k = torch.randn(2, 17, 2, 16).transpose(1, 2).requires_grad_()
    cos, sin = torch.randn(2, 17, 16), torch.randn(2, 17, 16)
    gq, gk = torch.randn(2, 4, 17, 16), torch.randn(2, 2, 17, 16)
    want = apply_rotary_pos_emb(q, k, cos, sin)
    want_grads = torch.autograd.grad(want, (q, k), (gq, gk))
    got = _fused_apply_rotary(apply_rotary_pos_emb)(q, k, cos, sin)
    assert "RopeFn" in type(got[0].grad_fn).__name__
    got_grads = torch.autograd.grad(got, (q, k), (gq, gk))
    for a, b in zip((*got, *got_grads), (*want, *want_grads), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # bf16 falls back to transformers' own function
    out = _fused_apply_rotary(apply_rotary_pos_emb)(q.bfloat16(), k.bfloat16(), cos.bfloat16(), sin.bfloat16())
    assert "RopeFn" not in type(out[0].grad_fn).__name__


@pytest.mark.parametrize("name", ["GemmaRMSNorm"])
def test_norms_with_other_maths_are_left_alone(name):
    try:
        from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    except ImportError:
        pytest.skip("no gemma in this transformers")
    norm = GemmaRMSNorm(8)
    assert use_fused_rms_norm(norm) == 0 and type(norm).__name__ == name


def test_the_trainer_fuses_on_cpu_trains_the_same_and_restores_everything(tmp_path, monkeypatch):
    """train.fused_ops: the same loss curve as the unfused run; norms and rope are restored after training."""
    import json

    from accelerate.state import AcceleratorState
    from conftest import QUICK_TRAIN, compose
    from transformers.models.llama import modeling_llama

    import engine.speed.apply as speed_apply
    from engine.pipeline import run

    fused_counts = []
    original_use = speed_apply.use_fused_rms_norm
    monkeypatch.setattr(speed_apply, "use_fused_rms_norm", lambda *a: fused_counts.append(original_use(*a)) or fused_counts[-1])
    original = modeling_llama.apply_rotary_pos_emb
    curves, norms = {}, {}
    for fused in (True, False):
        cfg = compose([*QUICK_TRAIN, "stages=[prepare_data,train]", "train.max_steps=3", f"train.fused_ops={fused}"])
        AcceleratorState._reset_state(reset_partial_state=True)
        ctx = run(cfg, tmp_path / str(fused))
        rows = (tmp_path / str(fused) / "train_log.jsonl").read_text().splitlines()
        curves[fused] = [json.loads(r)["loss"] for r in rows]
        norms[fused] = {type(m).__name__ for m in ctx.model().modules() if type(m).__name__.endswith("RMSNorm")}
        assert modeling_llama.apply_rotary_pos_emb is original
    assert fused_counts and fused_counts[0] > 0, "the fused run swapped no norm"
    assert len(fused_counts) == 1, "train.fused_ops=false still fused"
    assert norms[True] == norms[False] == {"LlamaRMSNorm"}
    assert curves[True] == pytest.approx(curves[False], rel=1e-4)


def test_speedups_enter_together_and_undo_everything():
    """engine.speed.apply.speedups: norms, rope, segments and compile applied inside, all undone on exit."""
    from transformers.models.llama import modeling_llama

    from engine.speed.apply import speedups

    model = LlamaForCausalLM(
        LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    )
    model.set_attn_implementation("sdpa")
    for p in model.parameters():
        p.requires_grad_(False)
    original = modeling_llama.apply_rotary_pos_emb
    kw = {"device_type": "cpu", "packing": True, "keep_freed_memory": False, "fused_ops": True, "compile": True}
    with pytest.raises(RuntimeError, match="boom"), speedups(model, **kw) as applied:
        assert applied.segments and model.config._attn_implementation == "sdpa_segments"
        assert applied.fused_norms == 3 and type(model.model.norm).__name__ == "FusedLlamaRMSNorm"
        assert applied.fused_rope == 1 and modeling_llama.apply_rotary_pos_emb is not original
        assert applied.compiled > 0 and model.model.norm._compiled_call_impl is not None
        raise RuntimeError("boom")  # undone on errors too
    assert model.config._attn_implementation == "sdpa"
    assert {type(m).__name__ for m in model.modules() if type(m).__name__.endswith("RMSNorm")} == {"LlamaRMSNorm"}
    assert modeling_llama.apply_rotary_pos_emb is original
    assert all(getattr(m, "_compiled_call_impl", None) is None for m in model.modules())
    with speedups(model, **{**kw, "device_type": "cuda", "packing": False, "compile": False}) as applied:
        assert not applied.segments and applied.fused_norms == 0  # CPU-only switches stay off elsewhere
