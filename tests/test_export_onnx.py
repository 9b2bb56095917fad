"""ONNX export (export_onnx, check_export): the tiny Llama merged -> ONNX with a KV cache -> onnxruntime, offline.

The tiny model's attention is sharpened as in test_export.py (random init is near-uniform), so
logits depend on the positions and the cache, and a wrong cache or weight shows in the numbers.
The stage-order rules of export_onnx are checked with export_gguf's in test_export.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import QUICK_TRAIN, run_engine

pytest.importorskip("onnxruntime")

TEXTS = ["What is the capital of France? Paris, I think.", "Name three greenhouse gases: CO2, methane, N2O."]


def tiny_base(tmp: Path) -> Path:
    """A tiny Llama with peaked attention (q, k x12; v, o x10), saved as an HF dir."""
    import torch

    from engine.model import TinySpec, build_tiny

    model, tokenizer = build_tiny(TinySpec(kind="tiny"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(12)
            elif name.endswith(("v_proj.weight", "o_proj.weight")):
                p.mul_(10)
    model.save_pretrained(tmp / "base")
    tokenizer.save_pretrained(tmp / "base")
    return tmp / "base"


def cases(base: Path):
    from transformers import AutoTokenizer

    from engine.export.check import Case

    tokenizer = AutoTokenizer.from_pretrained(base)
    out = []
    for text in TEXTS:
        ids = tokenizer(text, add_special_tokens=False).input_ids
        out.append(Case(forced=ids, prompt=ids[:6], messages=[]))
    return out


def hf_model(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).float().eval()


def measure(base: Path, onnx: Path):
    from engine.export.check import onnx_greedy, onnx_logits, parity
    from engine.export.onnx import OnnxLM

    return parity(hf_model(base), OnnxLM(onnx, threads=1), cases(base), new_tokens=8, logits=onnx_logits, greedy=onnx_greedy)


def limits() -> dict:
    from engine.export import GgufExportSpec

    check = GgufExportSpec(kind="gguf").check
    return {"top1": check.top1["onnx"], "max_dlogit": check.max_dlogit["onnx"], "greedy": check.greedy["onnx"]}


def test_onnx_logits_and_cached_steps_match_transformers(tmp_path):
    from engine.export.check import failures, hf_logits
    from engine.export.onnx import OnnxLM, write_onnx

    base = tiny_base(tmp_path)
    written = write_onnx(base, tmp_path / "export" / "model.onnx")
    assert written == [tmp_path / "export" / "model.onnx"]
    assert not list((tmp_path / "export").glob(".*")), "the exporter's scratch dir is removed"

    got = measure(base, written[0])
    assert got.top1 == 1.0 and got.greedy == 1.0, got
    assert got.max_dlogit < 1e-4, got
    assert failures("model.onnx", got, **limits()) == []

    # The cache itself: prompt once, then one token per step on the returned present key/values,
    # gives the logits the HF model computes over the whole sequence.
    lm, ids = OnnxLM(written[0]), cases(base)[0].forced
    logits, past = lm.step(ids[:5], None, 0)
    assert [p.shape[2] for p in past] == [5] * len(past)
    for t in range(5, 9):
        logits, past = lm.step(ids[t : t + 1], past, t)
    full = hf_logits(hf_model(base), ids[:9])
    assert np.abs(logits[-1] - full[-1]).max() < 1e-4
    names = [i.name for i in lm.session.get_inputs()]
    assert names[:3] == ["input_ids", "attention_mask", "position_ids"] and names[3] == "past_key_values.0.key"
    assert [o.name for o in lm.session.get_outputs()][:2] == ["logits", "present.0.key"]


def test_a_perturbed_export_is_caught_by_the_check(tmp_path):
    """A file that loads and runs but is not the model (one weight scaled before export): the thresholds say so."""
    import torch

    from engine.export.check import failures
    from engine.export.onnx import write_onnx

    def perturb(model):
        with torch.no_grad():
            model.model.layers[0].mlp.down_proj.weight.mul_(1.5)

    base = tiny_base(tmp_path)
    broken = write_onnx(base, tmp_path / "broken.onnx", _perturb=perturb)[0]
    got = measure(base, broken)
    problems = failures("broken.onnx", got, **limits())
    assert any("max |dlogit|" in p for p in problems), (got, problems)


@pytest.mark.slow
def test_train_merge_export_onnx_and_check(tmp_path):
    """The stages end to end: the manifest lists model.onnx with its size and parity numbers."""
    run = tmp_path / "run"
    proc = run_engine(
        *QUICK_TRAIN,
        "train.max_steps=1",
        "stages=[prepare_data,train,merge,export_onnx,check_export]",
        "export.check.prompts=2",
        "export.check.new_tokens=4",
        f"hydra.run.dir={run}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    entry = json.loads((run / "export" / "manifest.json").read_text())["files"]["model.onnx"]
    assert entry["kind"] == "onnx" and entry["bytes"] == (run / "export" / "model.onnx").stat().st_size
    check = json.loads((run / "metrics.json").read_text())["check_export"]
    assert check["passed"] and check["files"]["model.onnx"]["top1"] == 1.0
    assert check["files"]["model.onnx"] == entry["parity"]
