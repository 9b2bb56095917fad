"""The benchmark harness (bench/run.py) and the precision=auto loss check, on the tiny model."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import ROOT, compose

from engine.runtime import cpu_has_native_bf16

sys.path.insert(0, str(ROOT / "bench"))
import run as bench  # noqa: E402  (bench/run.py: a script, not a package)

RECORD_FIELDS = {
    "arm",
    "rep",
    "precision",
    "losses",
    "real_tokens",
    "padded_tokens",
    "real_tokens_per_s",
    "padded_tokens_per_s",
    "padding_efficiency",
    "time_to_first_step_s",
    "peak_rss_mb",
    "peak_cuda_mb",
    "steady_seconds",
    "model_shape",
    "row_lengths",
    "flops",
}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("bench") / "result.json"
    code = bench.main(["--model", "tiny", "--steps", "2", "--reps", "1", "--arms", "engine,trl_fp32", "--out", str(out)])
    assert code == 0
    return json.loads(out.read_text())


@pytest.mark.slow
def test_every_run_record_has_the_fields(smoke):
    assert [r["arm"] for r in smoke["runs"]] == ["engine", "trl_fp32"]
    for rec in smoke["runs"]:
        assert RECORD_FIELDS <= set(rec), RECORD_FIELDS - set(rec)
        assert len(rec["losses"]) == 2 and all(x > 0 for x in rec["losses"])
        assert rec["real_tokens"] > 0 and rec["padded_tokens"] >= rec["real_tokens"]
        assert 0 < rec["padding_efficiency"] <= 1
        assert rec["real_tokens_per_s"] > 0 and rec["time_to_first_step_s"] > 0 and rec["peak_rss_mb"] > 0
        # engine's precision=auto is bf16 on CPUs with native bf16 (AVX512-BF16/AMX), fp32 elsewhere
        assert rec["precision"] == ("bf16" if rec["arm"] == "engine" and cpu_has_native_bf16() else "fp32")
        # the tiny model against a bf16 matmul rate of ~1.5 TFLOP/s rounds to a fraction of 0.0
        assert rec["flops"]["achieved_gflops"] > 0 and 0 <= rec["flops"]["fraction"] <= 1


@pytest.mark.slow
def test_same_rows_same_order_same_tokens(smoke):
    """Both arms see the same examples in the same order: the loss curves are comparable."""
    engine, trl = smoke["runs"]
    assert engine["real_tokens"] == trl["real_tokens"]
    assert engine["row_lengths"] == trl["row_lengths"]
    assert engine["losses"][0] == pytest.approx(trl["losses"][0], rel=1e-3)


@pytest.mark.slow
def test_summary_has_ratio_and_machine(smoke):
    assert "engine/trl_fp32" in smoke["summary"]["ratios_real_tokens_per_s"]
    assert smoke["machine"]["matmul_gflops"]["fp32"] > 0
    assert "| engine |" in bench.markdown(smoke)


def test_flop_formula_counts_useful_work_only():
    rec = {
        "steady_real_tokens": 10,
        "steady_labelled_tokens": 4,
        "steady_sum_len_sq": 50,
        "model_shape": {"body_params": 100, "trainable_params": 3, "vocab": 7, "hidden": 2, "layers": 5},
    }
    assert bench.useful_flops(rec) == 10 * (4 * 100 + 6 * 3) + 4 * 4 * 7 * 2 + 50 * 6 * 5 * 2


def _losses(precision: str, run_dir: Path) -> tuple[list[float], str]:
    from accelerate.state import AcceleratorState

    from engine.pipeline import run

    cfg = compose(["model=tiny", "stages=[prepare_data,train]", "train.max_steps=6", f"precision={precision}"])
    AcceleratorState._reset_state(reset_partial_state=True)  # a fresh precision per run in one process
    ctx = run(cfg, run_dir)
    rows = [json.loads(x) for x in (run_dir / "train_log.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows], ctx.metrics["train"]["precision"]


def test_auto_precision_matches_fp32_loss_curve(tmp_path):
    """Whatever precision=auto picks on this machine must train like fp32 (bf16 included)."""
    from engine.runtime import resolve_precision

    fp32, _ = _losses("fp32", tmp_path / "fp32")
    auto, picked = _losses("auto", tmp_path / "auto")
    assert picked == resolve_precision("auto", "cpu")
    assert auto == pytest.approx(fp32, rel=0.02)
    # bf16 autocast is what auto picks on CPUs with native bf16: it must stay within tolerance too.
    bf16, picked = _losses("bf16", tmp_path / "bf16")
    assert picked == "bf16"
    assert bf16 == pytest.approx(fp32, rel=0.02)
