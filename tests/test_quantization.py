"""Quantized bases: linear layers really are 4/8-bit, the footprint shrinks, QLoRA learns.

The tiny model here is widened (hidden 256) so that, as in real LLMs, linear layers dominate
the parameter count; the real SmolLM2 check is marked slow, the phi-2 one needs a GPU.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY, compose, needs_bnb, run_engine

pytestmark = needs_bnb  # every test here quantizes with bitsandbytes

WIDE = [*TINY, "model.hidden_size=256", "model.intermediate_size=512", "device=cpu", "precision=fp32"]


def build(overrides):
    from engine.model import MODELS
    from engine.quantization import QUANTIZATIONS

    cfg = compose([*WIDE, *overrides])
    model, _ = MODELS.build(cfg.model, quantization_config=QUANTIZATIONS.build(cfg.quantization))
    return model


def decoder_linears(model):
    return {n: m for n, m in model.named_modules() if n.count(".layers.") and "proj" in n.rsplit(".", 1)[-1]}


@pytest.fixture(scope="module")
def fp32_model():
    return build(["quantization=none"])


@pytest.mark.parametrize("quant, max_ratio", [("nf4", 0.40), ("fp4", 0.40), ("int8", 0.60)])
def test_linear_layers_are_quantized_and_the_footprint_shrinks(fp32_model, quant, max_ratio):
    import bitsandbytes as bnb

    extra = ["quantization.compute_dtype=float32"] if quant != "int8" else []
    model = build([f"quantization={quant}", *extra])
    layer_type = bnb.nn.Linear8bitLt if quant == "int8" else bnb.nn.Linear4bit
    linears = decoder_linears(model)
    assert len(linears) == 2 * 7
    assert all(isinstance(m, layer_type) for m in linears.values()), {type(m).__name__ for m in linears.values()}
    ratio = model.get_memory_footprint() / fp32_model.get_memory_footprint()
    assert ratio <= max_ratio, f"{quant}: footprint {ratio:.0%} of fp32"


def test_nf4_model_computes_nearly_what_fp32_does(fp32_model):
    model = build(["quantization=nf4", "quantization.compute_dtype=float32"])
    ids = torch.tensor([[5, 17, 99, 3, 42, 8, 250, 11]])
    with torch.no_grad():
        a, b = fp32_model(input_ids=ids).logits.flatten(), model(input_ids=ids).logits.flatten()
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.95  # random weights: ~0.976 measured


def test_qlora_context_freezes_the_4bit_base(tmp_path):
    from engine.context import RunContext
    from engine.runtime import make_accelerator

    cfg = compose([*TINY, "quantization=nf4", "quantization.compute_dtype=float32", "adapter=lora"])
    model = RunContext(cfg=cfg, run_dir=tmp_path, accelerator=make_accelerator("cpu", "fp32")).model()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


@pytest.mark.slow
def test_qlora_smollm2_on_cpu_is_4bit_small_and_learns(tmp_path):
    """The real recipe: 4-bit linears, footprint <= 40% of fp32, loss falls over 20 steps."""
    from engine.model import MODELS
    from engine.quantization import QUANTIZATIONS

    cfg = compose(["recipe=qlora_smollm2"])
    q4, _ = MODELS.build(cfg.model, quantization_config=QUANTIZATIONS.build(cfg.quantization))
    fp32, _ = MODELS.build(cfg.model)
    assert q4.get_memory_footprint() <= 0.40 * fp32.get_memory_footprint()
    import bitsandbytes as bnb

    assert all(isinstance(m, bnb.nn.Linear4bit) for m in decoder_linears(q4).values())
    del q4, fp32

    run_dir = tmp_path / "run"
    proc = run_engine(
        "recipe=qlora_smollm2", "train.max_steps=20", "stages=[prepare_data,train]", f"hydra.run.dir={run_dir}", timeout=1500
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = [json.loads(line)["loss"] for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    assert len(losses) == 20
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_qlora_phi2_trains_20_steps_on_cuda(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_engine(
        "recipe=qlora_phi2", "train.max_steps=20", "stages=[prepare_data,train]", f"hydra.run.dir={run_dir}", timeout=3600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    train = json.loads((run_dir / "metrics.json").read_text())["train"]
    assert train["steps"] == 20 and train["tokens_per_s"] > 0
    assert train["device"].startswith("cuda")
