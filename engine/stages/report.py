"""report: report.md and a self-contained report.html: what ran, and base vs fine-tuned.

The report itself is engine/report/; this stage hands it what ran (``WhatRan``: the specs and
eval settings it names, not the whole config), the metrics so far and how to read metric names
(from the metric registry in engine/evaluate/metrics.py).
"""

from __future__ import annotations

from engine.context import RunConfig, RunContext
from engine.evaluate.metrics import lower_is_better_names, unit_scale_names
from engine.report import Scales, WhatRan, write_report
from engine.stages.registry import STAGES


@STAGES.register("report")
def report(ctx: RunContext) -> dict:
    """Write report.md and report.html (metrics table, plots, side-by-side generations)."""
    if not ctx.is_main:
        return {}
    scales = Scales(lower_is_better=lower_is_better_names(), unit=unit_scale_names())
    return write_report(ctx.run_dir, what_ran(ctx.cfg), ctx.metrics, scales)


def what_ran(cfg: RunConfig) -> WhatRan:
    """The part of the run config the report names."""
    return WhatRan(
        recipe=cfg.recipe,
        stages=list(cfg.stages),
        model=cfg.model,
        data=cfg.data,
        quantization=cfg.quantization.kind,
        adapter=cfg.adapter.kind,
        loss=cfg.loss.kind,
        reward=cfg.reward.kind if cfg.reward is not None else None,
        split=cfg.eval.split,
        report_examples=cfg.eval.report_examples,
        compare_run=cfg.eval.compare_run,
        notes=tuple(cfg.eval.notes),
        evaluated_run=cfg.evaluated_run.path if cfg.evaluated_run is not None else None,
    )
