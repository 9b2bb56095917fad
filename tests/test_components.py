"""Every valid quantization x adapter x loss combination trains 2 steps on the tiny model, and
exactly the intended parameters change and receive gradients; invalid combinations fail at
validation with the reason and a fix."""

from __future__ import annotations

import itertools

import pytest
from conftest import QUICK_TRAIN, TINY, compose, needs_bnb

from engine.errors import ConfigError

QUANTS = ["none", "nf4", "fp4", "int8"]
ADAPTERS = ["lora", "dora", "rslora", "none"]
LOSSES = ["ce", "ce_regression"]
# Why each is invalid, as the validation message says it.
REJECTED = {
    **{(q, "none"): "cannot be fully fine-tuned" for q in QUANTS if q != "none"},
    ("int8", "dora"): "int8 with DoRA fails on CPU",
}
COMBOS = list(itertools.product(QUANTS, ADAPTERS, LOSSES))
VALID = [c for c in COMBOS if c[:2] not in REJECTED]
INVALID = [c for c in COMBOS if c[:2] in REJECTED]

# A short, numeric data set so ce_regression has values to regress on.
QUICK = [
    *QUICK_TRAIN,
    "data=env_numeric",
    "data.limit=24",
    "train.max_steps=2",
    "quantization.compute_dtype=float32",
]


def intended(adapter: str, name: str) -> bool:
    """Which parameters the adapter is meant to train."""
    if adapter == "none":
        return True
    if adapter == "dora" and "lora_magnitude_vector" in name:
        return True
    return "lora_A" in name or "lora_B" in name


def make_context(cfg, run_dir):
    from engine.context import RunContext
    from engine.runtime import make_accelerator
    from engine.stages.prepare_data import prepare_data

    run_dir.mkdir(parents=True, exist_ok=True)
    ctx = RunContext(cfg=cfg, run_dir=run_dir, accelerator=make_accelerator("cpu", "fp32"))
    ctx.data = None
    ctx.record("prepare_data", prepare_data(ctx))
    return ctx


def overrides(quant, adapter, loss):
    args = [f"quantization={quant}", f"adapter={adapter}", f"loss={loss}", *QUICK]
    if quant not in ("nf4", "fp4"):
        args.remove("quantization.compute_dtype=float32")
    return args


@pytest.mark.parametrize(
    "quant, adapter, loss",
    [pytest.param(*c, id="-".join(c), marks=[needs_bnb] if c[0] != "none" else []) for c in VALID],
)
def test_two_steps_train_exactly_the_intended_parameters(quant, adapter, loss, tmp_path):
    import torch

    from engine.data.collate import Batches
    from engine.loss import LOSSES as LOSS_REGISTRY
    from engine.loss import forward_loss
    from engine.train import train
    from engine.train.job import TrainJob

    cfg = compose(overrides(quant, adapter, loss))
    ctx = make_context(cfg, tmp_path / "run")
    model = ctx.model()
    if quant != "none":
        import bitsandbytes as bnb

        linear = bnb.nn.Linear4bit if quant in ("nf4", "fp4") else bnb.nn.Linear8bitLt
        assert any(isinstance(m, linear) for m in model.modules()), f"no {linear.__name__} layer"
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    job = TrainJob(**ctx.training_inputs(), loss=cfg.loss)  # ctx.model() is the model above
    metrics = train(job)
    assert metrics["steps"] == 2
    assert metrics["final_loss"] is not None and metrics["final_loss"] == metrics["final_loss"]  # not NaN

    # 1. Exactly the intended tensors moved in 2 optimizer steps; everything else is untouched.
    after = dict(model.named_parameters())
    changed = {n for n, p in after.items() if not torch.equal(p.detach(), before[n])}
    meant = {n for n in after if intended(adapter, n)}
    assert meant, "the adapter added no trainable parameters"
    assert changed == meant, f"unexpected: {sorted(changed - meant)[:5]}; frozen: {sorted(meant - changed)[:5]}"

    # 2. A fresh backward gives gradients to exactly those tensors.
    batch = next(
        Batches(ctx.data.splits["train"], micro_batch_size=2, pad_id=ctx.tokenizer().pad_token_id, seed=0).stream(start=0)
    )
    batch.pop("real_tokens", None)
    loss_fn = LOSS_REGISTRY.build(cfg.loss, tokenizer=ctx.tokenizer())
    loss_value, parts = forward_loss(model, batch, loss_fn)
    loss_value.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == meant
    assert "ce" in parts
    if loss == "ce_regression":
        assert parts["reg_values"] == 2 and parts["reg_missing"] == 0
        assert parts["reg"] > 0


@pytest.mark.parametrize("quant, adapter, loss", INVALID, ids=["-".join(c) for c in INVALID])
def test_impossible_combinations_are_rejected_at_validation(quant, adapter, loss):
    with pytest.raises(ConfigError) as err:
        compose(overrides(quant, adapter, loss))
    message = str(err.value)
    assert REJECTED[quant, adapter] in message and "use quantization=" in message


def test_quantization_on_mps_is_rejected(monkeypatch):
    import torch

    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    with pytest.raises(ConfigError, match="no kernels for Apple MPS"):
        compose([*TINY, "quantization=nf4", "device=mps"])


def test_flash_attention_needs_its_package_or_cuda():
    with pytest.raises(ConfigError, match="model.attn_implementation: flash_attention_2"):
        compose([*TINY, "model.attn_implementation=flash_attention_2", "device=cpu"])


def test_layered_adapter_needs_its_stage():
    with pytest.raises(ConfigError, match="replace 'train' with 'train_layered'"):
        compose([*TINY, "adapter=layered"])
    with pytest.raises(ConfigError, match="train_layered needs adapter=layered"):
        compose([*TINY, "stages=[prepare_data,train_layered]"])


def test_adapter_presets_take_targets_from_the_model():
    cfg = compose(["model=phi2", "adapter=dora"])
    assert cfg.adapter.target_modules == ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"]
    for model in ["tinyllama_1b", "llama3_8b", "mistral_7b", "qwen2_5_0_5b"]:
        cfg = compose([f"model={model}", "adapter=rslora"])
        assert cfg.model.name_or_path and "q_proj" in cfg.adapter.target_modules


def test_rslora_scales_by_sqrt_rank(tmp_path):
    cfg = compose([*TINY, "adapter=rslora", "adapter.r=16", "adapter.alpha=8", "data.limit=8"])
    ctx = make_context(cfg, tmp_path / "run")
    layer = ctx.model().base_model.model.model.layers[0].self_attn.q_proj
    assert layer.scaling["default"] == pytest.approx(8 / 16**0.5)
