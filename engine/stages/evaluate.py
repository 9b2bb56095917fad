"""evaluate: the fine-tuned model and its base, on the same prompts, with the same metrics.

Runs at the end of training, or on its own against a finished run (``eval.run_dir``,
recipe eval_run): validation then took model, data and template from that run's
config.yaml (``cfg.evaluated_run``), and its adapter/ is loaded onto the base, so the
held-out split is the one it never trained on. The work is engine/evaluate/compare.py.

With a reward configured (``reward=...``, as a GRPO run has), the base's and the tuned
model's held-out answers are also scored with it: ``evaluate.reward`` in metrics.json
(engine/reward/evaluation.py).
"""

from __future__ import annotations

from engine.context import RunContext
from engine.evaluate.compare import EvalJob
from engine.evaluate.compare import evaluate as run
from engine.files import shown_path
from engine.reward.evaluation import with_reward
from engine.stages.registry import STAGES


@STAGES.register("evaluate", traits=("needs:data",))
def evaluate(ctx: RunContext) -> dict:
    """Base vs fine-tuned: generation metrics, behaviour suites, lm-eval."""
    cfg, acc, evaluated = ctx.cfg, ctx.accelerator, ctx.cfg.evaluated_run
    rag = ctx.retrieval  # after build_index: the split without passages, and with them for the '_rag' variants
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
    out = {**({"evaluated_run": shown_path(evaluated.path)} if evaluated else {}), **run(job)}
    if cfg.reward is not None and cfg.reward.kind != "none" and "skipped" not in out:
        acc.wait_for_everyone()  # rank 0 wrote generations.jsonl
        with_reward(out, cfg.reward, job.examples[: cfg.eval.max_examples], ctx.run_dir / "generations.jsonl", cfg.eval.split)
    return out
