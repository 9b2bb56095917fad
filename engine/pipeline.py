"""Run a validated config: make the run dir's context, run the stages in order, summarise."""

from __future__ import annotations

import time
from pathlib import Path

from engine.context import RunConfig, RunContext
from engine.lock import holding


def run(cfg: RunConfig, run_dir: Path) -> RunContext:
    from engine.runtime import make_accelerator

    accelerator = make_accelerator(cfg.device, cfg.precision)
    # One process per run dir, for the whole run (rank 0 only: the ranks of one launch share it).
    with holding(run_dir, enabled=accelerator.is_main_process):
        return _run_stages(cfg, run_dir, accelerator)


def _run_stages(cfg: RunConfig, run_dir: Path, accelerator) -> RunContext:
    from engine.stages import STAGES

    ctx = RunContext(cfg=cfg, run_dir=run_dir, accelerator=accelerator)
    # Before any stage runs: decide resume (a changed config is refused before config.yaml,
    # the frozen record of what this run is, is rewritten), then rank 0 writes config.yaml.
    from engine.train.checkpoint import prepare_run_dir

    prepare_run_dir(cfg, run_dir, accelerator)
    _seed(cfg.seed)
    for name in cfg.stages:
        t0 = time.perf_counter()
        if ctx.is_main:
            print(f"[engine] stage {name}", flush=True)
        metrics = STAGES.get(name).builder(ctx) or {}
        metrics.setdefault("seconds", round(time.perf_counter() - t0, 2))
        ctx.record(name, metrics)
    if ctx.is_main:
        print(summary(ctx), flush=True)
    return ctx


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
