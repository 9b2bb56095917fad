"""The optimizer and the learning-rate schedule, shared by every training loop here."""

from __future__ import annotations

import math

import torch

from engine.errors import ConfigError
from engine.train.job import Job
from engine.train.spec import TrainSpec, optimizer_problem


def total_steps(tcfg: TrainSpec, per_epoch: int, per_step: int) -> int:
    """``train.max_steps``, or enough steps for ``train.epochs`` passes of ``per_epoch`` units
    (micro-batches, prompts) taken ``per_step`` at a time."""
    if tcfg.max_steps:
        return tcfg.max_steps
    return max(1, math.ceil(tcfg.epochs * per_epoch / per_step))


def lr_lambda(schedule: str, warmup: int, total: int):
    """The lr factor at each step: linear warm-up, then constant, linear or cosine decay to 0."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


def make_optimizer(tcfg: TrainSpec, params, device_type: str):
    """AdamW from torch, or bitsandbytes' 8-bit / paged AdamW (CUDA only) to save optimizer memory."""
    kw = {"lr": tcfg.lr, "weight_decay": tcfg.weight_decay, "betas": tuple(tcfg.betas)}
    if tcfg.optimizer == "adamw":
        return torch.optim.AdamW(params, **kw)
    if why := optimizer_problem(tcfg.optimizer, device_type):
        raise ConfigError(why)
    try:
        import bitsandbytes as bnb
    except ImportError:  # the quant extra is not installed
        raise ConfigError(
            f"train.optimizer: {tcfg.optimizer} needs the bitsandbytes package: pip install 'engine[quant]' (or use adamw)"
        ) from None

    cls = {
        "adamw_8bit": bnb.optim.AdamW8bit,
        "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
        "paged_adamw_32bit": bnb.optim.PagedAdamW32bit,
    }
    return cls[tcfg.optimizer](params, **kw)


def optimize(job: Job, steps: int) -> tuple:
    """Optimizer and schedule over the trainable parameters only, the model and optimizer prepared
    by accelerate. Returns (model, optimizer, scheduler, trainable parameters of the prepared model).

    The scheduler is not given to accelerate: it would step it num_processes times per optimizer step.
    """
    acc, tcfg = job.accelerator, job.train
    optimizer = make_optimizer(tcfg, [p for p in job.model.parameters() if p.requires_grad], acc.device.type)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(tcfg.schedule, tcfg.warmup_steps, steps))
    model, optimizer = acc.prepare(job.model, optimizer)
    return model, optimizer, scheduler, [p for p in model.parameters() if p.requires_grad]


def reapply_hyperparameters(optimizer, scheduler, tcfg: TrainSpec) -> None:
    """Make the optimizer and schedule follow ``tcfg`` after a checkpoint's state was loaded.

    Why: loading a state dict brings back the *old* run's lr (the scheduler's base_lrs, each
    group's initial_lr and lr), weight decay and betas. The schedule's shape is already this
    config's (LambdaLR keeps the lambda it was built with), so the current lr is recomputed
    from it at the restored step, exactly as LambdaLR would. With an unchanged config every
    value is the one just loaded: resume stays bit-identical.
    """
    for group in optimizer.param_groups:
        group["initial_lr"] = tcfg.lr
        group["weight_decay"] = tcfg.weight_decay
        if "betas" in group:
            group["betas"] = tuple(tcfg.betas)
    scheduler.base_lrs = [tcfg.lr for _ in optimizer.param_groups]
    lrs = [base * f(scheduler.last_epoch) for f, base in zip(scheduler.lr_lambdas, scheduler.base_lrs, strict=True)]
    for group, lr in zip(optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
    scheduler._last_lr = lrs
