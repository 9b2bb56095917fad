"""Layered adapters: levels train in sequence on top of frozen ones, are saved separately and
load stacked with a scale each."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import QUICK_TRAIN, TINY, compose
from safetensors.torch import load_file

from engine.adapter import load_stacked

LAYERED = [
    *QUICK_TRAIN,
    "adapter=layered",
    "adapter.steps=[2,1,1]",
    "adapter.scales=[1.0,0.5,0.25]",
    "stages=[prepare_data,train_layered]",
    "data.limit=16",
]


@pytest.fixture(scope="module")
def layered_run(tmp_path_factory):
    from engine.pipeline import run

    cfg = compose(LAYERED)
    run_dir = tmp_path_factory.mktemp("layered") / "run"
    ctx = run(cfg, run_dir)
    return run_dir, ctx


def base_model():
    from engine.model import TinySpec, build_tiny

    model, _ = build_tiny(TinySpec(kind="tiny"))
    return model


def test_three_levels_are_written_as_separate_adapters(layered_run):
    run_dir, _ = layered_run
    for level in (1, 2, 3):
        d = run_dir / "adapter" / f"level_{level}"
        assert (d / "adapter_config.json").is_file() and (d / "adapter_model.safetensors").is_file()
    all_metrics = json.loads((run_dir / "metrics.json").read_text())
    metrics = all_metrics["train_layered"]
    assert [metrics["levels"][f"level_{k}"]["steps"] for k in (1, 2, 3)] == [2, 1, 1]
    assert all_metrics["train"]["steps"] == 4 and all_metrics["train"]["adapter_dir"].endswith("adapter")
    # Each level trained only its own parameters: the same count each time.
    counts = {metrics["levels"][f"level_{k}"]["trainable_params"] for k in (1, 2, 3)}
    assert len(counts) == 1


def test_lower_levels_stay_frozen_while_upper_levels_train(layered_run):
    run_dir, _ = layered_run
    after_own = load_file(run_dir / "levels" / "level_1" / "adapter" / "level_1" / "adapter_model.safetensors")
    final = load_file(run_dir / "adapter" / "level_1" / "adapter_model.safetensors")
    assert after_own.keys() == final.keys()
    assert all(torch.equal(after_own[k], final[k]) for k in final)
    level3 = load_file(run_dir / "adapter" / "level_3" / "adapter_model.safetensors")
    assert any(("lora_B" in k) and v.abs().sum() > 0 for k, v in level3.items()), "level 3 did not train"


def test_levels_1_and_2_load_stacked_with_chosen_scales(layered_run):
    run_dir, _ = layered_run
    scales = [1.0, 0.5]
    model = load_stacked(base_model(), run_dir / "adapter", [1, 2], scales)
    assert set(model.peft_config) == {"level_1", "level_2"}
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert sorted(layer.active_adapters) == ["level_1", "level_2"]
    x = torch.randn(3, layer.in_features)
    with torch.no_grad():
        expected = layer.base_layer(x)
        for name, s in zip(["level_1", "level_2"], scales, strict=True):
            alpha_over_r = layer.lora_alpha[name] / layer.r[name]
            expected = expected + s * alpha_over_r * layer.lora_B[name](layer.lora_A[name](x))
        assert torch.allclose(layer(x), expected, atol=1e-6)


def test_scale_zero_on_level_2_equals_level_1_alone(layered_run):
    from peft import PeftModel

    run_dir, _ = layered_run
    ids = torch.tensor([[5, 17, 99, 3, 42, 8]])
    with torch.no_grad():
        stacked = load_stacked(base_model(), run_dir / "adapter", [1, 2], [1.0, 0.0])(input_ids=ids).logits
        alone = PeftModel.from_pretrained(base_model(), run_dir / "adapter" / "level_1").eval()(input_ids=ids).logits
        both = load_stacked(base_model(), run_dir / "adapter", [1, 2], [1.0, 1.0])(input_ids=ids).logits
    assert torch.allclose(stacked, alone, atol=1e-5)
    assert not torch.allclose(both, alone, atol=1e-5)


def test_trained_model_is_left_stacked_with_the_eval_scales(layered_run):
    _, ctx = layered_run
    layer = ctx.model().base_model.model.model.layers[0].self_attn.q_proj
    assert sorted(layer.active_adapters) == ["level_1", "level_2", "level_3"]
    assert layer.scaling["level_3"] == pytest.approx(0.25 * layer.lora_alpha["level_3"] / layer.r["level_3"])


def test_missing_level_is_a_clear_error(layered_run, tmp_path):
    with pytest.raises(FileNotFoundError, match="level_4"):
        load_stacked(base_model(), layered_run[0] / "adapter", [1, 4])


def test_resume_never_moves_the_old_levels_aside(layered_run, tmp_path):
    """Without this, level_K's old checkpoints stay and are resumed by the next run (step-K is never rewritten)."""
    import shutil

    from engine.pipeline import run

    run_dir = tmp_path / "again"
    shutil.copytree(layered_run[0], run_dir)
    (run_dir / "levels" / "level_1" / "checkpoints" / "step-2" / "old").write_text("the earlier attempt")
    run(compose([*LAYERED, "train.resume=never"]), run_dir)
    assert len(list((run_dir / "superseded").glob("*/levels/level_1/checkpoints/step-2/old"))) == 1
    fresh = run_dir / "levels" / "level_1" / "checkpoints" / "step-2"
    assert (fresh / "state.json").is_file() and not (fresh / "old").exists()  # written afresh by this run


def test_layered_config_needs_one_value_per_level():
    from engine.errors import ConfigError

    with pytest.raises(ConfigError, match="adapter: steps has 2 values but levels is 3"):
        compose([*TINY, "adapter=layered", "adapter.steps=[1,2]", "stages=[prepare_data,train_layered]"])
