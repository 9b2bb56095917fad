"""A speed-up can never stop a run: each switch in engine/speed checks itself numerically when it
is entered, steps aside with one line when the library under it changed, and the run records it.

Each test breaks one switch the way an upstream release could (transformers 5.25 made
``apply_rotary_pos_emb`` a callable object; a release could change a norm's maths, a PEFT
release the LoRA layer, a torch build lack a compiler) and checks: the tiny run finishes, the
switch is reported as skipped with its reason in metrics.json, and the adapter equals the run
with that switch off.
"""

from __future__ import annotations

import json

import pytest
import torch
from accelerate.state import AcceleratorState
from conftest import QUICK_TRAIN, compose
from safetensors.torch import load_file

from engine.pipeline import run
from engine.speed.guard import SKIPPED, Switches, attempt

STEPS = ["stages=[prepare_data,train]", "train.max_steps=2", "adapter.dropout=0.1"]


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """accelerate keeps one process-wide state (mixed precision included): leave none behind."""
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def _train(tmp_path, name: str, *overrides: str) -> tuple[dict, dict]:
    """A 2-step tiny LoRA run in this process: (train metrics, adapter tensors)."""
    cfg = compose([*QUICK_TRAIN, *STEPS, *overrides])
    AcceleratorState._reset_state(reset_partial_state=True)
    out = tmp_path / name
    run(cfg, out)
    metrics = json.loads((out / "metrics.json").read_text())["train"]
    return metrics, load_file(out / "adapter" / "adapter_model.safetensors")


def _assert_same_adapter(a: dict, b: dict) -> None:
    """Equal within float tolerance: fused and stock nodes round differently (~1e-6 in the loss),
    which Adam's first steps turn into differences of ~1e-5 in weights of ~0.1; a different
    function or a skipped-but-applied switch moves them by ~lr (1e-2)."""
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=1e-4, msg=key)  # lr 1e-2: a real change moves ~1e-2


def _assert_skipped_and_same_as_off(tmp_path, switch: str, why: str, off: str, *overrides: str) -> dict:
    """With the library broken (by the caller), the run (with ``overrides``) finishes, ``switch`` is
    reported skipped with ``why`` in its reason, and the adapter equals the run with ``off`` instead."""
    metrics, adapter = _train(tmp_path, "broken", *overrides)
    status = metrics["speedups"][switch]
    assert status.startswith(SKIPPED) and why in status, metrics["speedups"]
    _, ref_adapter = _train(tmp_path, "off", off)
    _assert_same_adapter(adapter, ref_adapter)
    return metrics


class _RopeObject:
    """What transformers 5.25 made of ``apply_rotary_pos_emb``: a callable object, not a function
    (``inspect.getsource`` raises on it), computing Llama's rotary embedding."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, q, k, cos, sin, *args, **kwargs):
        return self.fn(q, k, cos, sin, *args, **kwargs)


def test_rotary_as_a_callable_object_is_checked_by_its_numbers_and_fused(tmp_path, monkeypatch):
    from transformers.models.llama import modeling_llama

    reference, ref_adapter = _train(tmp_path, "off", "train.fused_ops=false")
    monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", _RopeObject(modeling_llama.apply_rotary_pos_emb))
    metrics, adapter = _train(tmp_path, "object")
    assert metrics["speedups"]["fused_rope"].startswith("on"), metrics["speedups"]
    assert reference["speedups"]["fused_rope"].startswith("off")
    _assert_same_adapter(adapter, ref_adapter)


def test_rotary_that_computes_something_else_is_skipped_and_the_run_equals_fused_ops_off(tmp_path, monkeypatch):
    from transformers.models.llama import modeling_llama

    stock = modeling_llama.apply_rotary_pos_emb

    def other_rope(q, k, cos, sin, unsqueeze_dim=1):  # a release with other maths (here: rotation by -angle)
        return stock(q, k, cos, -sin, unsqueeze_dim=unsqueeze_dim)

    monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", _RopeObject(other_rope))
    _assert_skipped_and_same_as_off(tmp_path, "fused_rope", "differs from the stock code", "train.fused_ops=false")
    assert modeling_llama.apply_rotary_pos_emb.fn is other_rope  # left in place, not patched


def test_rotary_that_raises_or_is_not_callable_is_skipped(tmp_path, monkeypatch):
    from transformers.models.llama import modeling_llama

    class Broken:
        def __call__(self, *args, **kwargs):
            raise TypeError("takes 5 positional arguments")

    for replacement, why in ((Broken(), "TypeError"), (object(), "not callable")):
        sw = Switches(quiet=True)
        from engine.speed.fused_ops import check_rope

        assert attempt(sw, "fused_rope", lambda r=replacement: check_rope(r), lambda: True) is None
        assert why in sw.status["fused_rope"]
    monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", Broken())
    with pytest.raises(TypeError):  # the stock code itself is broken here: the run's own error, not ours
        _train(tmp_path, "broken")


def test_a_norm_with_other_maths_is_skipped_and_the_run_equals_fused_ops_off(tmp_path, monkeypatch):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    stock_forward = LlamaRMSNorm.forward
    monkeypatch.setattr(LlamaRMSNorm, "forward", lambda self, x: stock_forward(self, x) * 1.5)
    _assert_skipped_and_same_as_off(tmp_path, "fused_norms", "LlamaRMSNorm output", "train.fused_ops=false")


def test_a_changed_peft_lora_layer_is_skipped_and_the_run_equals_adapter_fused_off(tmp_path, monkeypatch):
    import engine.speed.fused_lora as fused_lora

    stock = fused_lora._LoraLinearFn.forward

    def wrong(ctx, x, weight, bias, lora_a, lora_b, scaling, p):  # e.g. PEFT changed how scaling is stored
        return stock(ctx, x, weight, bias, lora_a, lora_b, scaling * 2, p)

    monkeypatch.setattr(fused_lora._LoraLinearFn, "forward", staticmethod(wrong))
    _assert_skipped_and_same_as_off(tmp_path, "fused_lora", "LoRA output", "adapter.fused=false")


def test_broken_sparse_dropout_is_skipped_and_lora_keeps_torch_dropout(tmp_path, monkeypatch):
    import engine.speed.dropout as dropout

    monkeypatch.setattr(dropout, "drop_positions", lambda n, p, device=None: torch.arange(0, n, 2))
    metrics, _ = _train(tmp_path, "dropout")
    assert metrics["speedups"]["gap_dropout"].startswith(SKIPPED), metrics["speedups"]
    # the fused LoRA node draws the same positions: its check fails too, PEFT's own layer runs
    assert metrics["speedups"]["fused_lora"].startswith(SKIPPED), metrics["speedups"]


def test_packed_attention_that_transformers_refuses_falls_back_to_the_mask(tmp_path, monkeypatch):
    import transformers

    def refuse(*args, **kwargs):
        raise KeyError("AttentionInterface has no register in this release")

    monkeypatch.setattr(transformers.AttentionInterface, "register", classmethod(refuse))
    monkeypatch.setattr("engine.speed.attention._registered", False)
    metrics, adapter = _train(tmp_path, "segments", "data.packing=true")
    assert metrics["speedups"]["sdpa_segments"].startswith(SKIPPED), metrics["speedups"]
    monkeypatch.undo()
    good, ref_adapter = _train(tmp_path, "segments_ok", "data.packing=true")
    assert good["speedups"]["sdpa_segments"] == "on"
    _assert_same_adapter(adapter, ref_adapter)  # block-diagonal mask == per-example attention


def test_compile_that_fails_is_skipped(tmp_path, monkeypatch):
    def no_compiler(self, *args, **kwargs):
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")

    monkeypatch.setattr(torch.nn.Module, "compile", no_compiler)
    _assert_skipped_and_same_as_off(tmp_path, "compile", "C++ compiler", "train.compile=false", "train.compile=true")


def test_heap_tuning_without_glibc_is_off_and_the_run_goes_on(tmp_path, monkeypatch):
    import ctypes

    def no_libc(*args, **kwargs):
        raise OSError("libc.so.6: cannot open shared object file")

    monkeypatch.setattr(ctypes, "CDLL", no_libc)
    metrics, _ = _train(tmp_path, "heap")
    assert metrics["speedups"]["keep_freed_memory"].startswith("off"), metrics["speedups"]


def test_a_skipped_switch_prints_one_line_naming_it(capsys):
    sw = Switches()

    def check():
        raise AttributeError("module 'transformers' has no attribute 'AttentionInterface'")

    assert attempt(sw, "sdpa_segments", check, lambda: True) is None
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "sdpa_segments skipped" in out[0] and "AttributeError" in out[0]


def test_checks_do_not_move_the_runs_random_stream():
    from engine.speed.dropout import check_gap_dropout

    torch.manual_seed(0)
    sw = Switches(quiet=True)
    attempt(sw, "gap_dropout", check_gap_dropout, lambda: 1)
    after = torch.rand(3)
    torch.manual_seed(0)
    torch.testing.assert_close(after, torch.rand(3))


def test_every_switch_is_active_on_the_locked_versions(tmp_path):
    """The default recipe's switches on the tiny model (fp32, as on CPUs without native bf16):
    each one the config asks for is on. A silent fall-back after a version bump fails here."""
    metrics, _ = _train(tmp_path, "all", "data.packing=true", "stages=[prepare_data,train,report]")
    status = metrics["speedups"]
    for name in ("sdpa_segments", "keep_freed_memory", "fused_norms", "fused_rope", "gap_dropout", "fused_lora"):
        assert status[name].startswith("on"), f"{name}: {status[name]}"
    assert status["compile"].startswith("off")  # not asked for by default
    assert not any(v.startswith(SKIPPED) for v in status.values()), status
    assert "Speed-ups: sdpa_segments on; " in (tmp_path / "all" / "report.md").read_text()


def test_bf16_autocast_reports_the_fp32_only_nodes_off(tmp_path):
    metrics, _ = _train(tmp_path, "bf16", "precision=bf16")
    status = metrics["speedups"]
    for name in ("fused_norms", "fused_rope", "fused_lora"):
        assert status[name].startswith("off") and "autocast" in status[name], status


@pytest.mark.slow
def test_the_default_recipe_on_the_real_model_takes_every_switch_it_asks_for(tmp_path):
    """The shipped default (SmolLM2-135M, recipe lora_smollm2) through the CLI, as a user runs it,
    in fp32 (what precision=auto picks on CPUs without native bf16): no switch falls back, and
    every switch the recipe asks for is on."""
    from conftest import run_engine

    run = tmp_path / "run"
    proc = run_engine("train.max_steps=1", "precision=fp32", "stages=[prepare_data,train]", f"hydra.run.dir={run}", timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "skipped, running the stock code" not in proc.stdout + proc.stderr
    status = json.loads((run / "metrics.json").read_text())["train"]["speedups"]
    for name in ("keep_freed_memory", "fused_norms", "fused_rope", "gap_dropout", "fused_lora"):
        assert status[name].startswith("on"), f"{name}: {status[name]}"
    assert status["sdpa_segments"] == "off (no packing)" and status["compile"].startswith("off")
