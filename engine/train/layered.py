"""Layered adapters: train the levels in sequence, each on top of the frozen levels below.

Why levels: a base skill (level 1) and refinements (levels 2, 3) can be shipped, switched and
blended separately; each level only learns what the stack below it has not.

Each level is an ordinary training run of loop.py in its own sub-dir (``levels/level_K``:
log, checkpoints, resume), with only that level's parameters trainable. Afterwards
``adapter/`` holds every level as a separate PEFT adapter dir (``adapter/level_1`` ...),
loadable stacked with ``engine.adapter.load_stacked``.
"""

from __future__ import annotations

import dataclasses
import shutil

from engine.adapter import LayeredSpec, add_level, level_name, set_scales
from engine.files import shown_path
from engine.train.checkpoint import supersede
from engine.train.job import TrainJob
from engine.train.loop import train


@dataclasses.dataclass(frozen=True)
class Layered:
    """What a layered run reports."""

    levels: dict[str, dict]
    """Each level's training metrics, by level name."""
    scales: dict[str, float]
    """The scale each level is evaluated with (``adapter.scales``)."""
    summary: dict
    """The whole sequence as one training (level 1's first loss to the last level's final
    loss): what the run summary and the report read as ``train``."""


def train_layered(job: TrainJob, spec: LayeredSpec) -> Layered:
    """Train ``spec.levels`` LoRA levels on ``job.model`` one after another; save each as adapter/level_K.

    Level K trains ``spec.steps[K-1]`` steps (else ``train.max_steps``) with seed + K - 1 in
    ``run_dir/levels/level_K``; afterwards every level is active at its ``spec.scales`` weight.
    """
    run_dir, acc, model = job.run_dir, job.accelerator, job.model
    if job.train.resume == "never" and job.is_main:
        supersede(run_dir, ("levels",))  # else old levels' checkpoints would be resumed later
    acc.wait_for_everyone()
    out: dict = {}
    for level in range(1, spec.levels + 1):
        add_level(model, spec, level)
        steps = spec.steps[level - 1] if spec.steps else job.train.max_steps
        # Per level: its own step count, data order and run sub-dir (so checkpoints and
        # resume of one level never mix with another's).
        level_dir = run_dir / "levels" / level_name(level)
        if job.is_main:
            level_dir.mkdir(parents=True, exist_ok=True)
        level_job = dataclasses.replace(
            job, run_dir=level_dir, seed=job.seed + level - 1, train=job.train.model_copy(update={"max_steps": steps})
        )
        metrics = train(level_job)
        metrics["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        metrics["adapter_dir"] = shown_path(level_dir / "adapter", run_dir)  # the loop's is relative to level_dir
        out[level_name(level)] = metrics

    # The last level's save holds every level (PEFT writes one sub-dir per named adapter).
    final = run_dir / "adapter"
    if job.is_main:
        shutil.rmtree(final, ignore_errors=True)
        shutil.copytree(run_dir / "levels" / level_name(spec.levels) / "adapter", final)
    acc.wait_for_everyone()

    names = [level_name(k) for k in range(1, spec.levels + 1)]
    scales = dict(zip(names, spec.scales or [1.0] * spec.levels, strict=True))
    model.base_model.set_adapter(names, inference_mode=True)
    set_scales(model, scales)
    first, last = out[names[0]], out[names[-1]]
    summary = {
        "steps": sum(m["steps"] for m in out.values()),
        "first_loss": first.get("first_loss"),
        "final_loss": last.get("final_loss"),
        "tokens_per_s": last.get("tokens_per_s"),
        "precision": last.get("precision"),
        "device": last.get("device"),
        "adapter_dir": shown_path(final, run_dir),
    }
    return Layered(levels=out, scales=scales, summary=summary)
