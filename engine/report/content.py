"""What the report says, as blocks: what ran, data, training, evaluation, samples, export, adapter matrix, artifacts.

Reads only plain values: ``WhatRan`` (the specs and settings the report names, handed over by
the report stage), the metrics recorded so far (nested by stage, as in metrics.json) and files
in the run dir. Which metrics are better lower and which belong on the 0-1 bar plot comes from
the caller (the metric registry lives in the evaluate package, which this package does not import).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from engine.files import shown_path
from engine.model.names import display_name
from engine.render.page import Block
from engine.report.retrieval import retrieval_blocks
from engine.report.rl import rl_blocks
from engine.report.style import change, number
from engine.runs import METRICS, TRAIN_LOG, read_log, read_yaml

if TYPE_CHECKING:
    from engine.data.spec import DataSpec
    from engine.model import ModelSpec


@dataclass(frozen=True)
class Scales:
    """How to read metric names: the evaluate package's registry, handed over by the stage."""

    lower_is_better: frozenset[str] = frozenset()
    """A decrease is the improvement (perplexity, mae ...)."""
    unit: frozenset[str] = frozenset()
    """Always in [0, 1]: drawn on the base vs fine-tuned bar plot."""


@dataclass(frozen=True)
class WhatRan:
    """What the report reads of the run's config: the report stage fills it from the validated specs."""

    recipe: str
    stages: list[str]
    model: ModelSpec
    data: DataSpec
    quantization: str
    """The kind of each of these groups (the report names it, nothing more)."""
    adapter: str
    loss: str
    reward: str | None = None
    """The reward kind, when the run has a reward group."""
    split: str = "test"
    """``eval.split``: the split whose metrics the report tables."""
    report_examples: int = 5
    """``eval.report_examples``: side-by-side generations shown."""
    compare_run: str | None = None
    """``eval.compare_run``: a finished run whose metrics are tabled beside this run's."""
    notes: tuple[str, ...] = ()
    """``eval.notes``: paragraphs under the evaluation table."""
    evaluated_run: Path | None = None
    """The finished run this one evaluates again (``eval.run_dir``): its train_log.jsonl is plotted."""


def build(run_dir: Path, about: WhatRan, metrics: dict, scales: Scales) -> list[Block]:
    """All sections, in reading order; a section whose stage did not run is left out."""
    ev = metrics.get("evaluate", {})
    out = [Block("p", _what_ran(run_dir, about, ev))]
    if "prepare_data" in metrics:
        out += [Block("h2", "Data"), Block("p", _data_line(metrics["prepare_data"]))]
    if "train" in metrics:
        out += [Block("h2", "Training"), Block("p", _train_line(metrics["train"]))]
    log = _train_log(run_dir, about.evaluated_run)
    if log:
        from engine.report.plots import loss_curve

        out.append(
            Block("img", "Training loss per optimizer step", png=loss_curve(*zip(*log, strict=True)), path="plots/loss.png")
        )
    if ev and "skipped" not in ev:
        out += _evaluation(about, ev, scales)
        out += _samples(run_dir, about.report_examples)
    out += retrieval_blocks(metrics, about.split, scales.lower_is_better)
    out += rl_blocks(run_dir, metrics, about.reward)
    out += _export(run_dir)
    out += _adapter_matrix(run_dir)
    plots = any(b.kind == "img" for b in out)  # written with the report, after this list is built
    out += [Block("h2", "Artifacts"), Block("table", header=["file", "what"], rows=_artifacts(run_dir, plots))]
    return out


def _what_ran(run_dir: Path, about: WhatRan, ev: dict) -> str:
    # Paths as shown_path gives them: the report is mailed and attached, so no local place in it.
    data = f"{about.data.kind} from `{shown_path(about.data.path, run_dir)}`"
    parts = [
        f"Run dir `{shown_path(run_dir)}`; stages: {', '.join(about.stages)}.",
        f"Model: {about.model.kind} ({display_name(about.model)}), quantization: {about.quantization}, "
        f"adapter: {about.adapter}, loss: {about.loss}; data: {data}.",
    ]
    if ev.get("evaluated_run"):
        parts.append(f"Evaluates the finished run `{ev['evaluated_run']}` (its config and trained weights).")
    return " ".join(parts)


def _data_line(d: dict) -> str:
    return (
        f"{d.get('rows_read')} rows read, {d.get('rows_used')} used, {d.get('rows_rejected')} rejected "
        f"{d.get('rejected_by_reason') or ''}; splits: train {d.get('train_examples')}, "
        f"validation {d.get('validation_examples')}, test {d.get('test_examples')}; "
        f"{d.get('truncated')} truncated."
    )


def _train_line(t: dict) -> str:
    line = (
        f"{t.get('steps')} steps on {t.get('device')} (mixed precision: {t.get('precision')}) in "
        f"{t.get('train_seconds')} s, {t.get('tokens_per_s')} tokens/s; "
        f"loss {t.get('first_loss')} -> {t.get('final_loss')}."
    )
    speed = t.get("speedups")
    if isinstance(speed, dict) and speed:
        line += " Speed-ups: " + "; ".join(f"{k} {v}" for k, v in speed.items()) + "."
    return line


def _compare_table(names, tuned: dict, base: dict, scales: Scales, header=("base", "fine-tuned")) -> Block:
    if base:
        rows = [
            [k, number(base.get(k)), number(tuned.get(k)), change(base.get(k), tuned.get(k), k in scales.lower_is_better)]
            for k in names
        ]
        return Block("table", header=["metric", *header, "change"], rows=rows)
    return Block("table", header=["metric", header[1]], rows=[[k, number(tuned.get(k))] for k in names])


def _evaluation(about: WhatRan, ev: dict, scales: Scales) -> list[Block]:
    split = about.split
    tuned, base_all = ev.get(split, {}), ev.get("base", {})
    base = base_all.get(split, {})
    names = [k for k in tuned if k not in ("numeric_examples",)]
    out = [Block("h2", f"Evaluation: base vs fine-tuned ({split} split, {ev.get('examples')} held-out examples)")]
    out += [Block("p", _evaluation_note(ev, names)), _compare_table(names, tuned, base, scales)]
    if about.compare_run:
        out += _versus_run(about.compare_run, split, names, tuned, scales)
    out += [Block("p", text) for text in about.notes]
    unit = [k for k in names if k in scales.unit and isinstance(tuned.get(k), int | float)]
    if unit:
        from engine.report.plots import metric_bars

        png = metric_bars(unit, [base.get(k) for k in unit], [tuned.get(k) for k in unit], f"{split} split")
        out.append(Block("img", "Base vs fine-tuned, metrics on a 0-1 scale", png=png, path="plots/metrics.png"))
    if ev.get("suites"):
        s_tuned, s_base = ev["suites"], base_all.get("suites", {})
        out += [Block("h2", "Behaviour suites (pass rate)"), _compare_table(list(s_tuned), s_tuned, s_base, scales)]
    for task, task_metrics in (ev.get("lm_eval") or {}).items():
        b = (base_all.get("lm_eval") or {}).get(task, {})
        out += [Block("h2", f"lm-eval: {task}"), _compare_table(list(task_metrics), task_metrics, b, scales)]
    return out


def _evaluation_note(ev: dict, names: list[str]) -> str:
    note = [f"Same prompts for both; greedy decoding, stops: {', '.join(f'`{s!r}`' for s in ev.get('stops', []))}."]
    if "perplexity" in names:
        note.append("Perplexity is of the reference answers (lower is better).")
    if ev.get("cosine_backend"):
        note.append(f"Cosine similarity by {ev['cosine_backend']}.")
    return " ".join(note)


def _versus_run(run: str, split: str, names: list[str], tuned: dict, scales: Scales) -> list[Block]:
    """This run's fine-tuned metrics beside another finished run's (same split and metric names)."""
    path = Path(run).expanduser() / METRICS
    try:
        other_all = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        why = getattr(e, "strerror", None) or type(e).__name__  # str(e) would name the local path
        return [Block("p", f"eval.compare_run: could not read {shown_path(path)} ({why}); no comparison.")]
    other = other_all.get("evaluate", {}).get(split, {})
    steps = other_all.get("train", {}).get("steps")
    table = _compare_table([k for k in names if k in other], tuned, other, scales, header=("comparison run", "this run"))
    return [
        Block("h2", "This run vs the comparison run"),
        Block(
            "p", f"Comparison run `{shown_path(run)}`{_run_summary(run)}; {steps} training steps; same {split} split and metrics."
        ),
        table,
    ]


def _run_summary(run: str) -> str:
    cfg_path = Path(run).expanduser() / "config.yaml"
    if not cfg_path.is_file():
        return ""
    c = read_yaml(cfg_path)
    if not isinstance(c, dict):  # unreadable: the report says less, it does not fail
        return ""
    loss, train = c.get("loss") or {}, c.get("train") or {}
    return f" (loss {loss.get('kind')}, {train.get('max_steps')} steps, seed {c.get('seed')})"


def _samples(run_dir: Path, n: int) -> list[Block]:
    path = run_dir / "generations.jsonl"
    if not path.exists() or n == 0:
        return []
    rows = [json.loads(x) for x in path.read_text().splitlines()[:n]]
    out = [Block("h2", f"Side-by-side generations (first {len(rows)} held-out examples)")]
    for r in rows:
        question = r["prompt"].rsplit("user\n", 1)[-1].split("<|im_end|>")[0].strip()
        out.append(Block("sample", sample={"question": question, **r}))
    return out


def _train_log(run_dir: Path, evaluated: Path | None) -> list[tuple[int, float]]:
    """(step, loss) from train_log.jsonl here, or in the evaluated run's dir (``WhatRan.evaluated_run``;
    metrics.json shows that run without its local place, so the path comes from the config)."""
    for d in [run_dir, evaluated]:
        if d is not None and (d / TRAIN_LOG).exists():
            return [(r["step"], r["loss"]) for r in read_log(d / TRAIN_LOG) if "loss" in r]
    return []


def _export(run_dir: Path) -> list[Block]:
    """One row per file in export/manifest.json: size, parity numbers, the thresholds, pass/fail.

    Read from the manifest (export stages write it, check_export adds each file's numbers with
    the limits it was held to), so a report written before check_export still lists the files.
    """
    path = run_dir / "export" / "manifest.json"
    try:
        files = json.loads(path.read_text())["files"]
    except (OSError, ValueError, KeyError):
        return []
    header = ["file", "kind", "format", "MB", "top-1", "max |Δlogit|", "greedy", "thresholds", "chat template", "result"]
    rows = []
    for name, e in files.items():
        p = e.get("parity") or {}
        fmt = e.get("format") or ""
        if e.get("kind") == "lora":
            fmt = f"on {_base_name(e.get('base'))} ({e.get('base_format')})"
            if e.get("levels"):
                fmt += f", levels {e['levels']} x {e.get('scales')}"
        result = "not checked" if not p else {True: "pass", False: "FAIL"}.get(p.get("passed"), "n/a")
        rows.append(
            [
                f"`{name}`",
                e.get("kind", ""),
                fmt,
                f"{e['bytes'] / 1e6:.1f}" if isinstance(e.get("bytes"), int) else "n/a",
                number(p.get("top1")),
                f"{p['max_dlogit']:.3g}" if isinstance(p.get("max_dlogit"), int | float) else "n/a",  # spans 1e-6 .. 10
                number(p.get("greedy")),
                _limits_text(p),
                _chat_text(p.get("chat_template")),
                result,
            ]
        )
    note = (
        "Each file against the trained model on the same held-out token ids: teacher-forced top-1 agreement, "
        "largest |logit difference|, greedy-continuation agreement. A LoRA GGUF runs on its base GGUF and is held "
        "to that base's own agreement with the HF base (its floor) minus export.check.lora_margin; a quantised file "
        "to the same format made from the untrained base (its floor) minus export.check.quant_margin. Chat template: "
        "whether the template embedded in the GGUF renders the prompts to the training template's token ids."
    )
    return [Block("h2", "Export"), Block("p", note), Block("table", header=header, rows=rows)]


def _base_name(base) -> str:
    if isinstance(base, dict):
        return f"{base.get('package')}/{base.get('file')}" if base.get("package") else str(base.get("file"))
    return Path(str(base)).name


def _limits_text(p: dict) -> str:
    limits = p.get("limits") or {}
    parts = []
    floor = (p.get("base_floor") or p.get("floor") or {}).get("top1")
    what = "base floor" if p.get("base_floor") else "untrained base in this format"
    if limits.get("top1") is not None:
        parts.append(f"top-1 ≥ {limits['top1']}" + (f" ({what} {floor:.4f})" if floor is not None else ""))
    if limits.get("max_dlogit") is not None:
        parts.append(f"|Δ| ≤ {limits['max_dlogit']}")
    if limits.get("greedy") is not None:
        parts.append(f"greedy ≥ {limits['greedy']}")
    return ", ".join(parts) or "n/a"


def _chat_text(chat) -> str:
    if not chat:
        return "n/a"
    if not chat.get("embedded"):
        return "none embedded"
    if chat.get("same_ids"):
        return "same ids"
    if chat.get("same_text") and chat.get("ids_required") is False:
        return "same text (llama.cpp's SentencePiece spacing differs: docs/export.md)"
    return "DIFFERENT ids"


LATENCY_COLUMNS = [("ttft_p50_s", "TTFT p50 (s)", 3), ("tokens_per_s_p50", "tokens/s p50", 1), ("seconds", "seconds", 1)]


def _adapter_matrix(run_dir: Path) -> list[Block]:
    """One row per adapter set of adapter_matrix.json: text metrics, suite pass rates, latency.

    Read from the file the adapter_matrix stage writes (as the export table reads the manifest),
    so the report shows it whichever stage ran before.
    """
    try:
        data = json.loads((run_dir / "adapter_matrix.json").read_text())
        rows = data["rows"]
    except (OSError, ValueError, KeyError):
        return []
    metrics = [m for m in data.get("metrics", []) if any(m in r for r in rows)]
    suites = list(dict.fromkeys(k for r in rows for k in r.get("suites", {})))
    header = ["row", "adapters", *metrics, *(f"suite {s}" for s in suites), *(title for _, title, _ in LATENCY_COLUMNS)]
    table = []
    for r in rows:
        scales = ", ".join(f"{n} x{s:g}" for n, s in r.get("adapters", {}).items()) or "none"
        table.append(
            [
                f"{r['row']} ({r.get('kind')})",
                scales,
                *(number(r.get(m)) for m in metrics),
                *(number(r.get("suites", {}).get(s)) for s in suites),
                *("n/a" if r.get(k) is None else f"{r[k]:.{digits}f}" for k, _, digits in LATENCY_COLUMNS),
            ]
        )
    suite_text = f" and {data.get('suite_prompts')} behaviour-suite prompts ({', '.join(data['suites'])})" if suites else ""
    note = (
        f"The same {data.get('held_out')} held-out prompts ({data.get('split')} split){suite_text} for every row, "
        f"through the {data.get('backend')} backend of `{data.get('model')}`, {data.get('decoding', 'greedy')}, "
        f"at most {data.get('max_tokens')} tokens per held-out answer. Text metrics are against the references; "
        "suites are pass rates (overall: their mean). TTFT is the time to the first token (prompt included); "
        "tokens/s the decode rate after it (median over the row's answers); seconds the row's total. "
        "Every answer: adapter_matrix.jsonl."
    )
    return [Block("h2", "Adapter QA matrix"), Block("p", note), Block("table", header=header, rows=table)]


ARTIFACTS = [
    ("config.yaml", "resolved config"),
    ("metrics.json", "all metrics, nested by stage"),
    ("train_log.jsonl", "step, loss, lr, tokens/s"),
    ("samples.jsonl", "GRPO: every sampled answer with its step, prompt, reward and reward parts"),
    ("adapter", "PEFT adapter (peft.PeftModel.from_pretrained)"),
    ("model", "full fine-tuned model (no adapter)"),
    ("generations.jsonl", "prompts, references, base and fine-tuned answers with ROUGE-L"),
    ("suites.jsonl", "behaviour-suite answers, pass/fail and failed checks"),
    ("lm_eval_tasks", "the lm-eval task YAMLs that were run"),
    ("merged", "the adapter(s) folded into the base: a plain HF model dir (from_pretrained)"),
    ("export", "exported files (GGUF, ONNX) and manifest.json with their sizes and parity numbers"),
    ("retrieval", "the FAISS index (index.faiss), its meta.json (passages, embedder, corpus hash), cached contexts"),
    ("adapter_matrix.json", "the adapter QA matrix: per base / adapter / blend, quality and latency"),
    ("adapter_matrix.csv", "the same matrix, one line per row"),
    ("adapter_matrix.jsonl", "every matrix prompt with each row's answer"),
    ("chat.jsonl", "the terminal chat's turns: messages, answer, adapter set, timing"),
    ("plots", "the report's plots as PNG"),
    ("rejected.jsonl", "rows that could not be used, with the reason"),
]


def _artifacts(run_dir: Path, plots: bool) -> list[list[str]]:
    return [[f"`{name}`", what] for name, what in ARTIFACTS if (run_dir / name).exists() or (name == "plots" and plots)]
