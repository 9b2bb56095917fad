"""merge: fold the trained adapter(s) into the base; write run_dir/merged, a plain HF model dir.

The trained weights are this run's (adapter/, adapter/level_K with adapter.scales, or model/)
or, with ``eval.run_dir``, that finished run's: exporting needs no retraining. The work is
engine/export/merge.py; ``AutoModelForCausalLM.from_pretrained(run_dir/merged)`` loads the result.
"""

from __future__ import annotations

from engine.context import RunContext
from engine.export.merge import merge_trained, merged_record, trained_weights
from engine.stages.registry import STAGES


@STAGES.register("merge", traits=("gives:merged",))
def merge(ctx: RunContext) -> dict:
    """Adapter(s) folded into the (de-quantized) base: run_dir/merged, loadable with from_pretrained."""
    cfg, evaluated = ctx.cfg, ctx.cfg.evaluated_run.path if ctx.cfg.evaluated_run else None
    trained = trained_weights(ctx.run_dir, evaluated, cfg.adapter)
    out = ctx.run_dir / "merged"
    if ctx.is_main:
        merge_trained(trained, out, model_spec=cfg.model, quant_spec=cfg.quantization, data_spec=cfg.data)
    ctx.accelerator.wait_for_everyone()
    return merged_record(out, trained, run_dir=ctx.run_dir, evaluated=evaluated)
