"""Execute a frozen run: read run_dir/config.yaml, make the run's context, run its stages in order.

Why from the file: the command line was composed and validated once, by the CLI, which froze the
result into config.yaml (engine/config/record.py); every process that executes the run (the
CLI's own, each rank under ``accelerate launch``, each sweep job) reads that record, so all of
them run exactly what was recorded. ``run`` is the programmatic door (tests, bench): freeze a
validated config, then execute it the same way.
"""

from __future__ import annotations

import time
from pathlib import Path

from engine.config import record
from engine.context import RunConfig, RunContext
from engine.errors import UserError
from engine.lock import holding
from engine.stages import STAGES


def run(cfg: RunConfig, run_dir: Path) -> RunContext:
    """Freeze a validated config into ``run_dir`` and execute it (one process)."""
    with holding(run_dir):
        record.freeze(cfg, Path(run_dir))
        return execute(run_dir)


def execute(run_dir: Path) -> RunContext:
    """Run the stages of ``run_dir/config.yaml`` (every rank of a launch calls this)."""
    from engine.runtime import make_accelerator

    cfg = record.read(run_dir)
    accelerator = make_accelerator(cfg.device, cfg.precision)
    # One process per run dir, for the whole run (rank 0 only: the ranks of one launch share it).
    with holding(run_dir, enabled=accelerator.is_main_process):
        return _run_stages(cfg, Path(run_dir), accelerator)


def _run_stages(cfg: RunConfig, run_dir: Path, accelerator) -> RunContext:
    ctx = RunContext(cfg=cfg, run_dir=run_dir, accelerator=accelerator)
    _seed(cfg.seed)
    for i, name in enumerate(cfg.stages):
        t0 = time.perf_counter()
        if ctx.is_main:
            print(f"[engine] stage {name}", flush=True)
        try:
            metrics = STAGES.get(name).builder(ctx) or {}
        except UserError:
            if "reports_failure" in STAGES.get(name).traits:
                _report_failure(ctx, cfg.stages[i + 1 :])
            raise
        metrics.setdefault("seconds", round(time.perf_counter() - t0, 2))
        ctx.record(name, metrics)
    if ctx.is_main:
        print(summary(ctx), flush=True)
    return ctx


def _report_failure(ctx: RunContext, later: list[str]) -> None:
    """A stage whose failure is a verdict (check_export: the numbers are the finding) still gets the
    report the recipe lists after it, with what failed and by how much, before the run stops.
    A report that cannot be written here is said in one line; the stage's own error is what exits."""
    if "report" not in later or not ctx.is_main:
        return
    print("[engine] stage report (after the failure above)", flush=True)
    try:
        ctx.record("report", STAGES.get("report").builder(ctx) or {})
    except Exception as e:  # the failure being reported matters more than this one
        print(f"[engine] the report could not be written: {type(e).__name__}: {e}", flush=True)


def _seed(seed: int) -> None:
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _precision(mixed: str | None) -> str:
    """accelerate says 'no' for full precision; people say fp32."""
    return "fp32" if mixed in (None, "no") else mixed


def summary(ctx: RunContext) -> str:
    """One screen: where the run is and the numbers that matter."""
    m = ctx.metrics
    lines = ["", "=" * 72, f"engine: {ctx.cfg.recipe} finished", f"run dir: {ctx.run_dir}"]
    if "train" in m:
        t = m["train"]
        lines.append(
            f"train: {t.get('steps')} steps, loss {t.get('first_loss')} -> {t.get('final_loss')}, "
            f"{t.get('tokens_per_s')} tokens/s ({_precision(t.get('precision'))} on {t.get('device')})"
        )
    ev = m.get("evaluate", {})
    split = ctx.cfg.eval.split
    for key, value in ev.get(split, {}).items():
        if not isinstance(value, int | float):  # e.g. r2 is None when references do not vary
            continue
        base = ev.get("base", {}).get(split, {}).get(key)
        rest = f"   (base {base:.4f}, {value - base:+.4f})" if isinstance(base, int | float) else ""
        lines.append(f"eval {split} {key}: {value:.4f}{rest}")
    if (ctx.run_dir / "report.md").exists():
        lines.append(f"report: {ctx.run_dir / 'report.md'}")
    lines.append("=" * 72)
    return "\n".join(lines)
