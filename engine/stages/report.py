"""report: report.md and a self-contained report.html: what ran, and base vs fine-tuned.

The report itself is engine/report/; this stage hands it the config, the metrics so far
and how to read metric names (from the metric registry in engine/evaluate/metrics.py).
"""

from __future__ import annotations

from engine.stages.registry import STAGES


@STAGES.register("report")
def report(ctx) -> dict:
    """Write report.md and report.html (metrics table, plots, side-by-side generations)."""
    if not ctx.is_main:
        return {}
    from engine.evaluate.metrics import lower_is_better_names, unit_scale_names
    from engine.report import Scales, write_report

    scales = Scales(lower_is_better=lower_is_better_names(), unit=unit_scale_names())
    return write_report(ctx.run_dir, ctx.cfg, ctx.metrics, scales)
