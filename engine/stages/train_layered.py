"""train_layered: train adapter levels in sequence, each on top of the frozen levels below.

Why levels: a base skill (level 1) and refinements (levels 2, 3) can be shipped, switched and
blended separately; each level only learns what the stack below it has not.

Each level is an ordinary training run of engine/train/loop.py in its own sub-dir
(``levels/level_K``: log, checkpoints, resume), with only that level's parameters trainable.
Afterwards ``adapter/`` holds every level as a separate PEFT adapter dir
(``adapter/level_1`` ...), loadable stacked with ``engine.adapter.load_stacked``.
"""

from __future__ import annotations

import dataclasses
import shutil

from engine.stages.prepare_data import ensure_data
from engine.stages.registry import STAGES


@STAGES.register("train_layered", traits=("trains",))
def train_layered(ctx) -> dict:
    """Train adapter.levels LoRA levels one after another; save each as adapter/level_K."""
    from engine.adapter import add_level, level_name, set_scales
    from engine.files import shown_path
    from engine.train.checkpoint import supersede
    from engine.train.loop import TrainJob
    from engine.train.loop import train as run

    ensure_data(ctx)
    cfg, run_dir = ctx.cfg, ctx.run_dir
    if cfg.train.resume == "never" and ctx.is_main:
        supersede(run_dir, ("levels",))  # else old levels' checkpoints would be resumed later
    ctx.accelerator.wait_for_everyone()
    spec = cfg.adapter
    model = ctx.model()
    out: dict = {}
    for level in range(1, spec.levels + 1):
        add_level(model, spec, level)
        steps = spec.steps[level - 1] if spec.steps else cfg.train.max_steps
        # Per level: its own step count, data order and run sub-dir (so checkpoints and
        # resume of one level never mix with another's).
        level_cfg = dataclasses.replace(cfg, seed=cfg.seed + level - 1, train=cfg.train.model_copy(update={"max_steps": steps}))
        level_dir = run_dir / "levels" / level_name(level)
        if ctx.is_main:
            level_dir.mkdir(parents=True, exist_ok=True)
        metrics = run(TrainJob(level_cfg, level_dir, ctx.accelerator, model, ctx.tokenizer(), ctx.data))
        metrics["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        metrics["adapter_dir"] = shown_path(level_dir / "adapter", run_dir)  # the loop's is relative to level_dir
        out[level_name(level)] = metrics

    # The last level's save holds every level (PEFT writes one sub-dir per named adapter).
    final = run_dir / "adapter"
    if ctx.is_main:
        shutil.rmtree(final, ignore_errors=True)
        shutil.copytree(run_dir / "levels" / level_name(spec.levels) / "adapter", final)
    ctx.accelerator.wait_for_everyone()

    scales = spec.scales or [1.0] * spec.levels
    names = [level_name(k) for k in range(1, spec.levels + 1)]
    model.base_model.set_adapter(names, inference_mode=True)
    set_scales(model, dict(zip(names, scales, strict=True)))
    last = out[names[-1]]
    # The run summary and report read ``train``: the whole sequence, level 1's first loss to
    # the last level's final loss; per-level details stay under ``train_layered``.
    ctx.record(
        "train",
        {
            "steps": sum(m["steps"] for m in out.values()),
            "first_loss": out[names[0]].get("first_loss"),
            "final_loss": last.get("final_loss"),
            "tokens_per_s": last.get("tokens_per_s"),
            "precision": last.get("precision"),
            "device": last.get("device"),
            "adapter_dir": shown_path(final, run_dir),
        },
    )
    return {"levels": out, "eval_scales": dict(zip(names, scales, strict=True))}
