"""merge: fold the trained adapter(s) into the base; write run_dir/merged, a plain HF model dir.

The trained weights are this run's (adapter/, adapter/level_K with adapter.scales, or model/)
or, with ``eval.run_dir``, that finished run's: exporting needs no retraining. The work is
engine/export/merge.py; ``AutoModelForCausalLM.from_pretrained(run_dir/merged)`` loads the result.
"""

from __future__ import annotations

from pathlib import Path

from engine.stages.registry import STAGES


def trained_of(ctx):
    """This run's trained weights, or those of the run named by eval.run_dir."""
    from engine.export.merge import find_trained

    evaluated = ctx.cfg.evaluated_run
    scales = getattr(ctx.cfg.adapter, "scales", None)
    return find_trained(evaluated.path if evaluated else ctx.run_dir, scales=scales)


@STAGES.register("merge")
def merge(ctx) -> dict:
    """Adapter(s) folded into the (de-quantized) base: run_dir/merged, loadable with from_pretrained."""
    from engine.export.merge import dir_bytes, load_trained, merge_to_dir, training_template
    from engine.files import shown_path

    cfg = ctx.cfg
    trained = trained_of(ctx)
    out = ctx.run_dir / "merged"
    if ctx.is_main:
        model, tokenizer = load_trained(cfg.model, cfg.quantization, trained, progress=True)
        merge_to_dir(model, tokenizer, out, chat_template=training_template(cfg.data, tokenizer))
    ctx.accelerator.wait_for_everyone()
    # Paths as shown_path records them: "from" is relative to the run that trained the weights,
    # and "run" (with eval.run_dir) names that run.
    source = trained.adapter_dir or trained.model_dir
    evaluated = cfg.evaluated_run
    where = {"run": shown_path(evaluated.path)} if evaluated else {}
    trained_in = evaluated.path if evaluated else ctx.run_dir
    return {
        "dir": shown_path(out, ctx.run_dir),
        "bytes": dir_bytes(out),
        "from": shown_path(source, trained_in),
        **where,
        "levels": trained.levels,
        "scales": trained.scales,
    }


def ensure_merged(ctx) -> Path:
    """run_dir/merged, merging first when the stage list leaves merge out."""
    out = ctx.run_dir / "merged"
    if not (out / "config.json").is_file():
        ctx.record("merge", merge(ctx))
    return out
