"""report: report.md in the run dir (what ran, key metrics, where the artifacts are)."""

from __future__ import annotations

import json

from engine.stages import STAGES


@STAGES.register("report")
def report(ctx) -> dict:
    """Write report.md: what ran, base vs fine-tuned metrics, sample generations, artifacts."""
    if ctx.is_main:
        (ctx.run_dir / "report.md").write_text(render(ctx))
    return {"path": str(ctx.run_dir / "report.md")}


def render(ctx) -> str:
    cfg, m = ctx.cfg, ctx.metrics
    lines = [
        f"# Run report: {cfg.recipe}",
        "",
        f"- run dir: `{ctx.run_dir}`",
        f"- stages: {', '.join(cfg.stages)}",
        f"- model: {cfg.model.kind} ({_model_name(cfg.model)}), quantization: {cfg.quantization.kind}, "
        f"adapter: {cfg.adapter.kind}, loss: {cfg.loss.kind}",
        f"- data: {cfg.data.kind} from `{cfg.data.path}`",
        "",
    ]
    if "prepare_data" in m:
        d = m["prepare_data"]
        lines += [
            "## Data",
            "",
            f"{d.get('rows_read')} rows read, {d.get('rows_used')} used, {d.get('rows_rejected')} rejected "
            f"{d.get('rejected_by_reason') or ''}; splits: train {d.get('train_examples')}, "
            f"validation {d.get('validation_examples')}, test {d.get('test_examples')}; "
            f"{d.get('truncated')} truncated.",
            "",
        ]
    if "train" in m:
        t = m["train"]
        lines += [
            "## Training",
            "",
            f"{t.get('steps')} steps on {t.get('device')} (mixed precision: {t.get('precision')}) in "
            f"{t.get('train_seconds')} s, {t.get('tokens_per_s')} tokens/s; "
            f"loss {t.get('first_loss')} -> {t.get('final_loss')}.",
            "",
        ]
    if "evaluate" in m:
        lines += _eval_table(cfg, m["evaluate"]) + _samples(ctx)
    lines += ["## Artifacts", ""]
    for name, what in [
        ("config.yaml", "resolved config"),
        ("metrics.json", "all metrics, nested by stage"),
        ("train_log.jsonl", "step, loss, lr, tokens/s"),
        ("adapter", "PEFT adapter (peft.PeftModel.from_pretrained)"),
        ("model", "full fine-tuned model (no adapter)"),
        ("generations.jsonl", "prompts, references and generations"),
        ("rejected.jsonl", "rows that could not be used, with the reason"),
    ]:
        if (ctx.run_dir / name).exists():
            lines.append(f"- `{name}`: {what}")
    return "\n".join(lines) + "\n"


def _model_name(spec) -> str:
    return getattr(spec, "name_or_path", None) or getattr(spec, "file", None) or spec.kind


def _eval_table(cfg, ev: dict) -> list[str]:
    split = cfg.eval.split
    tuned = ev.get(split, {})
    base = ev.get("base", {}).get(split, {})
    out = [f"## Evaluation ({split} split, {ev.get('examples')} held-out examples)", ""]
    if base:
        out += ["| metric | base | fine-tuned | change |", "|---|---|---|---|"]
        for k, v in tuned.items():
            b = base.get(k)
            out.append(f"| {k} | {b:.4f} | {v:.4f} | {v - b:+.4f} |")
    else:
        out += ["| metric | fine-tuned |", "|---|---|"] + [f"| {k} | {v:.4f} |" for k, v in tuned.items()]
    return out + [""]


def _samples(ctx, n: int = 3) -> list[str]:
    path = ctx.run_dir / "generations.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(x) for x in path.read_text().splitlines()[:n]]
    out = ["## Sample generations", ""]
    for i, r in enumerate(rows, 1):
        question = r["prompt"].rsplit("user\n", 1)[-1].split("<|im_end|>")[0].strip()
        out += [f"**{i}. {question[:300]}**", "", f"- reference: {r['reference']}"]
        if "base" in r:
            out.append(f"- base: {r['base']}")
        out += [f"- fine-tuned: {r['finetuned']}", ""]
    return out
