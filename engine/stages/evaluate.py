"""evaluate: the fine-tuned model and its base, on the same prompts, with the same metrics.

Runs at the end of training, or on its own against a finished run (``eval.run_dir``,
recipe eval_run): validation then took model, data and template from that run's
config.yaml (``cfg.evaluated_run``), and its adapter/ is loaded onto the base, so the
held-out split is the one it never trained on. The work is engine/evaluate/compare.py.

With a reward configured (``reward=...``, as a GRPO run has), the base's and the tuned
model's held-out answers are also scored with it: ``evaluate.reward`` in metrics.json.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from engine.stages.prepare_data import ensure_data
from engine.stages.registry import STAGES


@STAGES.register("evaluate")
def evaluate(ctx) -> dict:
    """Base vs fine-tuned: generation metrics, behaviour suites, lm-eval."""
    from engine.evaluate.compare import EvalJob
    from engine.evaluate.compare import evaluate as run
    from engine.files import shown_path

    ensure_data(ctx)
    cfg, acc, evaluated = ctx.cfg, ctx.accelerator, ctx.cfg.evaluated_run
    rag = ctx.retrieval  # retrieval on: the split without passages, and with them for the '_rag' variants
    splits = rag.plain if rag is not None and rag.plain else ctx.data.splits
    job = EvalJob(
        model=acc.unwrap_model(ctx.model()),
        tokenizer=ctx.tokenizer(),
        spec=cfg.eval,
        examples=splits[cfg.eval.split],
        rag_examples=rag.rag.get(cfg.eval.split) if rag is not None and rag.rag else None,
        template=ctx.data.template,
        run_dir=ctx.run_dir,
        device=acc.device,
        autocast=acc.autocast,
        loss=cfg.loss,
        base_model=(evaluated.base_model if evaluated else None) or cfg.model,
        quantization=cfg.quantization,
        main=ctx.is_main,
    )
    where = {"evaluated_run": shown_path(evaluated.path)} if evaluated else {}
    out = {**where, **run(job)}
    if cfg.reward is not None and cfg.reward.kind != "none" and "skipped" not in out:
        ctx.accelerator.wait_for_everyone()  # rank 0 wrote generations.jsonl
        scores = reward_scores(cfg.reward, job.examples[: cfg.eval.max_examples], ctx.run_dir / "generations.jsonl")
        if "finetuned" in scores:
            # The total also sits beside the split's metrics: the summary and the report's
            # base vs fine-tuned table show it with its change; the parts stay under ``reward``.
            out.setdefault(cfg.eval.split, {})["reward"] = scores["finetuned"]
            if "base" in scores:
                out.setdefault("base", {}).setdefault(cfg.eval.split, {})["reward"] = scores["base"]
            out["reward"] = scores
    return out


def reward_scores(spec, examples: list, generations: Path) -> dict:
    """The run's reward on the answers evaluate just generated: mean total and mean parts per model.

    Why here: the reward is the number a GRPO run trained on; scoring the base's and the tuned
    model's held-out answers with it (the same texts the other metrics saw) says whether training
    raised it. Read from generations.jsonl, the record of those answers (row i answers examples[i]).
    """
    from engine.reward import REWARDS, items_from_examples

    if not generations.is_file():
        return {}
    rows = [json.loads(line) for line in generations.read_text().splitlines() if line.strip()]
    items = items_from_examples(examples)
    reward = REWARDS.build(spec)
    out: dict = {"kind": spec.kind, "examples": len(rows)}
    parts: dict[str, dict[str, float]] = {}
    for variant in ("base", "finetuned"):
        if not rows or variant not in rows[0]:
            continue
        scored = reward.score([r[variant] for r in rows], items[: len(rows)])
        out[variant] = round(statistics.fmean(s.value for s in scored), 6)
        for name in sorted({k for s in scored for k in s.parts}):
            values = [s.parts[name] for s in scored if name in s.parts]
            parts.setdefault(name, {})[variant] = round(statistics.fmean(values), 6)
    out["parts"] = parts
    return out
