"""report: report.md and a self-contained report.html: what ran, and base vs fine-tuned.

The report is built once as a list of blocks (heading, paragraph, table, image, sample)
and written twice: Markdown (plots as PNG files under plots/) and HTML (the same PNGs
inlined as base64, so the one file can be mailed or attached to a ticket).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from engine.stages.registry import STAGES

LOWER_IS_BETTER = {"perplexity", "mae", "rmse", "mae_ev", "rmse_ev"}
UNIT_SCALE = {"exact_match", "token_f1", "bleu", "rougeL", "cosine", "within_tol", "parse_rate", "within_tol_ev"}


@dataclass
class Block:
    kind: str  # h2 | p | table | img | sample
    text: str = ""
    header: list[str] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)
    png: bytes = b""
    name: str = ""
    sample: dict = field(default_factory=dict)


@STAGES.register("report")
def report(ctx) -> dict:
    """Write report.md and report.html (metrics table, plots, side-by-side generations)."""
    if not ctx.is_main:
        return {}
    from engine.report.html import to_html

    title = f"Run report: {ctx.cfg.recipe}"
    blocks = build(ctx)
    plots = ctx.run_dir / "plots"
    for b in blocks:
        if b.kind == "img":
            plots.mkdir(exist_ok=True)
            (plots / b.name).write_bytes(b.png)
    (ctx.run_dir / "report.md").write_text(to_markdown(title, blocks))
    (ctx.run_dir / "report.html").write_text(to_html(title, blocks))
    return {"path": str(ctx.run_dir / "report.md"), "html": str(ctx.run_dir / "report.html")}


def build(ctx) -> list[Block]:
    cfg, m = ctx.cfg, ctx.metrics
    ev = m.get("evaluate", {})
    out = [Block("p", _what_ran(ctx, ev))]
    if "prepare_data" in m:
        d = m["prepare_data"]
        out += [
            Block("h2", "Data"),
            Block(
                "p",
                (
                    f"{d.get('rows_read')} rows read, {d.get('rows_used')} used, {d.get('rows_rejected')} rejected "
                    f"{d.get('rejected_by_reason') or ''}; splits: train {d.get('train_examples')}, "
                    f"validation {d.get('validation_examples')}, test {d.get('test_examples')}; "
                    f"{d.get('truncated')} truncated."
                ),
            ),
        ]
    if "train" in m:
        t = m["train"]
        out += [
            Block("h2", "Training"),
            Block(
                "p",
                (
                    f"{t.get('steps')} steps on {t.get('device')} (mixed precision: {t.get('precision')}) in "
                    f"{t.get('train_seconds')} s, {t.get('tokens_per_s')} tokens/s; "
                    f"loss {t.get('first_loss')} -> {t.get('final_loss')}."
                ),
            ),
        ]
    log = _train_log(ctx, ev)
    if log:
        from engine.report.plots import loss_curve

        out.append(Block("img", "Training loss per optimizer step", png=loss_curve(*zip(*log, strict=True)), name="loss.png"))
    if ev and "skipped" not in ev:
        out += _evaluation(cfg, ev)
        out += _samples(ctx, cfg.eval.report_examples)
    out += [Block("h2", "Artifacts"), Block("table", header=["file", "what"], rows=_artifacts(ctx.run_dir))]
    return out


def _what_ran(ctx, ev: dict) -> str:
    cfg = ctx.cfg
    model = getattr(cfg.model, "name_or_path", None) or getattr(cfg.model, "file", None) or cfg.model.kind
    parts = [
        f"Run dir `{ctx.run_dir}`; stages: {', '.join(cfg.stages)}.",
        f"Model: {cfg.model.kind} ({model}), quantization: {cfg.quantization.kind}, adapter: {cfg.adapter.kind}, "
        f"loss: {cfg.loss.kind}; data: {cfg.data.kind} from `{cfg.data.path}`.",
    ]
    if ev.get("evaluated_run"):
        parts.append(f"Evaluates the finished run `{ev['evaluated_run']}` (its config and trained weights).")
    return " ".join(parts)


def _fmt(v) -> str:
    if v is None:
        return "n/a"
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def _change(name: str, base, tuned) -> str:
    if not isinstance(base, int | float) or not isinstance(tuned, int | float):
        return ""
    delta = tuned - base
    better = delta < 0 if name in LOWER_IS_BETTER else delta > 0
    mark = "" if abs(delta) < 1e-9 else (" better" if better else " worse")
    return f"{delta:+.4f}{mark}"


def _compare_table(names, tuned: dict, base: dict) -> Block:
    if base:
        rows = [[k, _fmt(base.get(k)), _fmt(tuned.get(k)), _change(k, base.get(k), tuned.get(k))] for k in names]
        return Block("table", header=["metric", "base", "fine-tuned", "change"], rows=rows)
    return Block("table", header=["metric", "fine-tuned"], rows=[[k, _fmt(tuned.get(k))] for k in names])


def _evaluation(cfg, ev: dict) -> list[Block]:
    from engine.report.plots import metric_bars

    split = cfg.eval.split
    tuned, base_all = ev.get(split, {}), ev.get("base", {})
    base = base_all.get(split, {})
    names = [k for k in tuned if k not in ("numeric_examples",)]
    out = [Block("h2", f"Evaluation: base vs fine-tuned ({split} split, {ev.get('examples')} held-out examples)")]
    note = [f"Same prompts for both; greedy decoding, stops: {', '.join(f'`{s!r}`' for s in ev.get('stops', []))}."]
    if "perplexity" in names:
        note.append("Perplexity is of the reference answers (lower is better).")
    if ev.get("cosine_backend"):
        note.append(f"Cosine similarity by {ev['cosine_backend']}.")
    out += [Block("p", " ".join(note)), _compare_table(names, tuned, base)]
    if cfg.eval.compare_run:
        out += _versus_run(cfg.eval.compare_run, split, names, tuned)
    out += [Block("p", text) for text in cfg.eval.notes]
    unit = [k for k in names if k in UNIT_SCALE and isinstance(tuned.get(k), int | float)]
    if unit:
        png = metric_bars(unit, [base.get(k) for k in unit], [tuned.get(k) for k in unit], f"{split} split")
        out.append(Block("img", "Base vs fine-tuned, metrics on a 0-1 scale", png=png, name="metrics.png"))
    if ev.get("suites"):
        s_tuned, s_base = ev["suites"], base_all.get("suites", {})
        out += [Block("h2", "Behaviour suites (pass rate)"), _compare_table(list(s_tuned), s_tuned, s_base)]
    for task, metrics in (ev.get("lm_eval") or {}).items():
        b = (base_all.get("lm_eval") or {}).get(task, {})
        out += [Block("h2", f"lm-eval: {task}"), _compare_table(list(metrics), metrics, b)]
    return out


def _versus_run(run: str, split: str, names: list[str], tuned: dict) -> list[Block]:
    """This run's fine-tuned metrics beside another finished run's (same split and metric names)."""
    path = Path(run).expanduser() / "metrics.json"
    try:
        other_all = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        return [Block("p", f"eval.compare_run: could not read {path} ({e}); no comparison.")]
    other = other_all.get("evaluate", {}).get(split, {})
    cfg_path = Path(run).expanduser() / "config.yaml"
    what = ""
    if cfg_path.is_file():
        import yaml

        c = yaml.safe_load(cfg_path.read_text()) or {}
        what = f" (loss {c.get('loss', {}).get('kind')}, {c.get('train', {}).get('max_steps')} steps, seed {c.get('seed')})"
    steps = other_all.get("train", {}).get("steps")
    rows = [[k, _fmt(other.get(k)), _fmt(tuned.get(k)), _change(k, other.get(k), tuned.get(k))] for k in names if k in other]
    return [
        Block("h2", "This run vs the comparison run"),
        Block("p", f"Comparison run `{run}`{what}; {steps} training steps; same {split} split and metrics."),
        Block("table", header=["metric", "comparison run", "this run", "change"], rows=rows),
    ]


def _samples(ctx, n: int) -> list[Block]:
    path = ctx.run_dir / "generations.jsonl"
    if not path.exists() or n == 0:
        return []
    rows = [json.loads(x) for x in path.read_text().splitlines()[:n]]
    out = [Block("h2", f"Side-by-side generations (first {len(rows)} held-out examples)")]
    for r in rows:
        question = r["prompt"].rsplit("user\n", 1)[-1].split("<|im_end|>")[0].strip()
        out.append(Block("sample", sample={"question": question, **r}))
    return out


def _train_log(ctx, ev: dict) -> list[tuple[int, float]]:
    """(step, loss) from train_log.jsonl here, or in the evaluated run's dir."""
    for d in [ctx.run_dir, Path(ev["evaluated_run"]) if ev.get("evaluated_run") else None]:
        if d is not None and (d / "train_log.jsonl").exists():
            rows = [json.loads(x) for x in (d / "train_log.jsonl").read_text().splitlines() if x.strip()]
            return [(r["step"], r["loss"]) for r in rows if "loss" in r]
    return []


def _artifacts(run_dir: Path) -> list[list[str]]:
    known = [
        ("config.yaml", "resolved config"),
        ("metrics.json", "all metrics, nested by stage"),
        ("train_log.jsonl", "step, loss, lr, tokens/s"),
        ("adapter", "PEFT adapter (peft.PeftModel.from_pretrained)"),
        ("model", "full fine-tuned model (no adapter)"),
        ("generations.jsonl", "prompts, references, base and fine-tuned answers with ROUGE-L"),
        ("suites.jsonl", "behaviour-suite answers, pass/fail and failed checks"),
        ("lm_eval_tasks", "the lm-eval task YAMLs that were run"),
        ("plots", "the report's plots as PNG"),
        ("rejected.jsonl", "rows that could not be used, with the reason"),
    ]
    return [[f"`{name}`", what] for name, what in known if (run_dir / name).exists()]


def to_markdown(title: str, blocks: list[Block]) -> str:
    lines = [f"# {title}", ""]
    for b in blocks:
        if b.kind == "h2":
            lines += [f"## {b.text}", ""]
        elif b.kind == "p":
            lines += [b.text, ""]
        elif b.kind == "table":
            lines += ["| " + " | ".join(b.header) + " |", "|" + "---|" * len(b.header)]
            lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in b.rows] + [""]
        elif b.kind == "img":
            lines += [f"![{b.text}](plots/{b.name})", ""]
        elif b.kind == "sample":
            s = b.sample
            lines += [f"**{_one_line(s['question'], 300)}**", "", f"- reference: {_one_line(s['reference'])}"]
            if "base" in s:
                lines.append(f"- base (ROUGE-L {s.get('base_rougeL', 0):.2f}): {_one_line(s['base'])}")
            lines += [f"- fine-tuned (ROUGE-L {s.get('finetuned_rougeL', 0):.2f}): {_one_line(s['finetuned'])}", ""]
    return "\n".join(lines) + "\n"


def _one_line(text: str, limit: int = 600) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
