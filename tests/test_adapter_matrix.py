"""The adapter QA matrix: base, two adapters and a blend on one prompt suite, through the hf backend.

A tiny random-init Llama with two random LoRA adapters (non-zero B, so each set changes the
greedy answers). The package is run directly (rows, numbers in range, determinism, files, the
report section), and the stage as a user runs it: recipe adapter_matrix_smollm2 on the tiny
model with a finished run's adapter, a second adapter and a blend -> 4 rows in
adapter_matrix.json and in report.md.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from conftest import compose, run_engine
from test_chat import fake_run, save_adapter, tiny_backend

from engine.errors import ConfigError, UserError
from engine.serve.backend import AdapterScale, GenerateRequest

QA = [
    ("Why do rivers meander?", "Erosion on the outer bank and deposition on the inner bank."),
    ("What is ozone?", "A molecule of three oxygen atoms."),
    ("What causes acid rain?", "Sulfur dioxide and nitrogen oxides dissolving in rain."),
]


SUITE = """name: tiny_format
description: two cases of the shipped kinds of checks, short answers (a tiny random model answers anything)
max_new_tokens: 8
cases:
  - id: list
    prompt: List three greenhouse gases as a numbered list.
    checks: {numbered_list: 3}
  - id: short
    prompt: In one word, what gas do plants take in?
    checks: {max_words: 5, refuses: false}
"""


def write_suite(root: Path) -> Path:
    """A suite YAML of our own (eval.suites takes paths): the shipped ones ask for up to 128 tokens per case."""
    path = root / "tiny_format.yaml"
    path.write_text(SUITE)
    return path


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("matrix")
    return {"a": save_adapter(root / "a", seed=1), "b": save_adapter(root / "b", seed=2)}


@pytest.fixture(scope="module")
def backend(adapters):
    b = tiny_backend(adapters)
    yield b
    b.close()


@pytest.fixture(scope="module")
def result(backend, tmp_path_factory):
    from engine.evaluate.suites import load
    from engine.serve.matrix import HeldOut, MatrixJob, rows_for, run_matrix

    job = MatrixJob(
        backend=backend,
        rows=rows_for(["a", "b"], {"half": {"a": 0.5, "b": 0.5}}),
        held_out=[HeldOut([{"role": "user", "content": q}], ref) for q, ref in QA],
        max_tokens=8,
        suites=[load(str(write_suite(tmp_path_factory.mktemp("suite"))))],
        refusal_patterns=[r"\bsorry\b"],
        progress=False,
    )
    return job, run_matrix(job)


def test_four_rows_with_quality_and_latency_in_range(result):
    job, out = result
    rows = {r["row"]: r for r in out["rows"]}
    assert list(rows) == ["base", "a", "b", "half"]
    assert [r["kind"] for r in rows.values()] == ["base", "adapter", "adapter", "blend"]
    assert rows["half"]["adapters"] == {"a": 0.5, "b": 0.5} and rows["base"]["adapters"] == {}
    cases = len(job.suites[0].cases)
    for r in rows.values():
        assert 0.0 <= r["token_f1"] <= 1.0 and 0.0 <= r["rougeL"] <= 1.0
        assert set(r["suites"]) == {"tiny_format", "overall"} and 0.0 <= r["suites"]["overall"] <= 1.0
        assert 0.0 < r["ttft_p50_s"] < 30 and r["tokens_per_s_p50"] > 0 and r["seconds"] > 0
        assert 1 <= r["tokens"] <= 3 * 8 + cases * job.suites[0].max_new_tokens
    assert out["held_out"] == 3 and out["suite_prompts"] == cases
    assert len(out["answers"]) == 3 + cases


def test_adapter_rows_answer_differently_from_the_base_and_as_their_set_does(result, backend):
    job, out = result
    answers = out["answers"]
    for name in ("a", "b", "half"):
        differ = sum(a["answers"][name] != a["answers"]["base"] for a in answers)
        assert differ >= len(answers) // 2, f"row {name} answers like the base on {len(answers) - differ} prompts"
    # A row's answer is the backend's greedy answer with that row's adapter set (and the same on a rerun).
    first = answers[0]
    blend = (AdapterScale("a", 0.5), AdapterScale("b", 0.5))
    ids = backend.render_chat([{"role": "user", "content": first["prompt"]}])
    direct = "".join(p.text for p in backend.generate(GenerateRequest(ids, 8, temperature=0, adapters=blend)))
    assert first["answers"]["half"] == direct.strip()
    assert first["reference"] == QA[0][1]


def test_matrix_files_and_report_section(result, tmp_path):
    from engine.report import Scales, write_report
    from engine.serve.matrix import write_matrix
    from engine.stages.report import what_ran

    job, out = result
    about = {"backend": "hf", "model": "tiny", "split": "test", "held_out": 3, "suites": ["tiny_format"]}
    about |= {"suite_prompts": out["suite_prompts"], "metrics": job.metrics, "max_tokens": 8, "decoding": "greedy"}
    assert write_matrix(out, tmp_path, about=about) == {
        "files": ["adapter_matrix.json", "adapter_matrix.csv", "adapter_matrix.jsonl"]
    }
    data = json.loads((tmp_path / "adapter_matrix.json").read_text())
    assert data["model"] == "tiny" and [r["row"] for r in data["rows"]] == ["base", "a", "b", "half"]
    table = list(csv.DictReader((tmp_path / "adapter_matrix.csv").open()))
    assert [r["row"] for r in table] == ["base", "a", "b", "half"]
    assert table[3]["adapters"] == "a=0.5 b=0.5" and float(table[1]["suite_overall"]) <= 1.0
    assert len((tmp_path / "adapter_matrix.jsonl").read_text().splitlines()) == len(out["answers"])

    cfg = compose(["recipe=adapter_matrix_smollm2", "model=tiny"])
    write_report(tmp_path, what_ran(cfg), {}, Scales())
    md = (tmp_path / "report.md").read_text()
    section = md.split("## Adapter QA matrix", 1)[1].split("\n## ", 1)[0]
    header = next(line for line in section.splitlines() if line.startswith("| row"))
    assert "token_f1" in header and "suite tiny_format" in header and "TTFT p50 (s)" in header and "tokens/s p50" in header
    body = [line for line in section.splitlines() if line.startswith("| ") and line != header]
    assert [line.split("|")[1].strip() for line in body] == ["base (base)", "a (adapter)", "b (adapter)", "half (blend)"]
    assert "Adapter QA matrix" in (tmp_path / "report.html").read_text()


def test_blends_must_name_loaded_adapters_and_metrics_must_be_text_metrics():
    from engine.serve.matrix import rows_for

    with pytest.raises(UserError, match=r"serve.matrix.blends.mix: adapter 'c' is not loaded; loaded: a, b"):
        rows_for(["a", "b"], {"mix": {"a": 0.5, "c": 0.5}})
    with pytest.raises(UserError, match="the label is taken"):
        rows_for(["a", "b"], {"a": {"a": 0.5}})
    with pytest.raises(ConfigError, match="need the model's logits"):
        compose(["recipe=adapter_matrix_smollm2", "model=tiny", "serve.matrix.metrics=[token_f1,cosine]"])


def test_recipe_runs_base_run_adapter_second_adapter_and_blend(tmp_path):
    """The stage as a user runs it: eval.run_dir's adapter, one from serve.adapters, one blend -> 4 rows."""
    run = fake_run(tmp_path / "outputs")
    save_adapter(tmp_path / "outputs" / "other" / "adapter", seed=2)
    proc = run_engine(
        "recipe=adapter_matrix_smollm2",
        "device=cpu",
        f"eval.run_dir={run}",
        f"serve.adapter_dirs=[{tmp_path / 'outputs'}]",
        "serve.adapters={b: other/adapter}",
        "serve.matrix.blends={half: {run1: 0.5, b: 0.5}}",
        "eval.max_examples=3",
        "eval.max_new_tokens=6",
        f"eval.suites=[{write_suite(tmp_path)}]",
        f"hydra.run.dir={tmp_path / 'matrix'}",
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "matrix"
    data = json.loads((out / "adapter_matrix.json").read_text())
    rows = [(r["row"], r["kind"]) for r in data["rows"]]  # adapters in load order: serve.adapters, then the run's
    assert rows == [("base", "base"), ("b", "adapter"), ("run1", "adapter"), ("half", "blend")]
    assert data["held_out"] == 3 and data["model"] == "tiny" and data["backend"] == "hf"
    assert str(tmp_path) not in json.dumps(data)  # no local path
    metrics = json.loads((out / "metrics.json").read_text())["adapter_matrix"]
    assert set(metrics["rows"]) == {"base", "run1", "b", "half"}
    assert all(0 <= r["token_f1"] <= 1 and r["ttft_p50_s"] > 0 for r in metrics["rows"].values())
    answers = [json.loads(x) for x in (out / "adapter_matrix.jsonl").read_text().splitlines()]
    assert any(a["answers"]["run1"] != a["answers"]["base"] for a in answers)
    assert "## Adapter QA matrix" in (out / "report.md").read_text()
