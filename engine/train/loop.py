"""The training loop: our own, on HF accelerate, read top to bottom.

Why not HF Trainer: we need exact control of what a checkpoint holds (adapter, optimizer,
scheduler, every rank's RNG, data position, config hash) and when it counts as complete,
so that a run killed at any moment resumes bit-identically (see checkpoint.py); a
loss that projects to the vocabulary only at labelled positions; packed batches with
block-diagonal masks; and OOM recovery that keeps the data position meaningful. Trainer's
checkpoints and data skipping give none of these guarantees. Accelerate still does device
placement, mixed precision and DDP/FSDP/DeepSpeed wrapping.

The loop, per optimizer step: fetch ``grad_accum`` micro-batches from a deterministic
stream -> forward/backward each (split further after a CUDA OOM) -> clip, step, schedule ->
stop if training blew up -> maybe evaluate -> append to train_log.jsonl -> maybe checkpoint.

Read it as three parts: ``set_up`` (data stream, optimizer, schedule, resume), ``train_step``
(one optimizer step, numbered comments) and ``finish`` (final weights, summary). The CPU speed
switches are entered around all of it in one place, ``engine.speed.apply.speedups``.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import re
import signal
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import torch

from engine.data.collate import Batches
from engine.errors import ConfigError, UserError
from engine.files import portable_config, shown_path
from engine.loss import LOSSES, forward_loss
from engine.speed.apply import speedups
from engine.train import checkpoint as ckpt_io

CORE_KEYS = ("step", "loss", "lr", "tokens", "tokens_per_s")


class Interrupted(UserError):
    """SIGTERM / Ctrl-C: a checkpoint was written; exit status 128 + signal number."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


@dataclass
class TrainState:
    """Everything about progress that a checkpoint must carry besides tensors."""

    step: int = 0
    data_position: int = 0
    """Micro-batches consumed from the (per-process) stream: where resume continues."""
    tokens: int = 0
    best: float | None = None
    best_step: int | None = None
    bad_evals: int = 0
    splits: int = 1
    """Each micro-batch is cut into this many pieces (doubles after a CUDA OOM)."""
    since_eval: float = 0.0
    since_eval_steps: int = 0


def lr_lambda(schedule: str, warmup: int, total: int):
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


def total_steps(tcfg, n_micro_per_epoch: int) -> int:
    if tcfg.max_steps:
        return tcfg.max_steps
    return max(1, math.ceil(tcfg.epochs * n_micro_per_epoch / tcfg.grad_accum))


def make_optimizer(tcfg, params, device_type: str):
    """AdamW from torch, or bitsandbytes' 8-bit / paged AdamW (CUDA only) to save optimizer memory."""
    kw = {"lr": tcfg.lr, "weight_decay": tcfg.weight_decay, "betas": tuple(tcfg.betas)}
    if tcfg.optimizer == "adamw":
        return torch.optim.AdamW(params, **kw)
    if device_type != "cuda":
        raise ConfigError(
            f"train.optimizer: {tcfg.optimizer} (bitsandbytes) needs a CUDA GPU; this run is on {device_type}: use adamw"
        )
    import bitsandbytes as bnb

    cls = {
        "adamw_8bit": bnb.optim.AdamW8bit,
        "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
        "paged_adamw_32bit": bnb.optim.PagedAdamW32bit,
    }
    return cls[tcfg.optimizer](params, **kw)


@dataclass(frozen=True)
class TrainJob:
    """What one training run needs, as plain values (a stage builds it from the run context)."""

    cfg: Any
    """The validated RunConfig (train, loss, data, seed and raw are read)."""
    run_dir: Path
    """Where train_log.jsonl, checkpoints/ and adapter/ go."""
    accelerator: Any
    model: Any
    tokenizer: Any
    data: Any
    """The prepared DataBundle (train and validation splits)."""

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process


@dataclass
class _Run:
    """What set-up hands to every step and to finish: prepared objects, progress, outputs."""

    job: TrainJob
    model: Any
    """As prepared by accelerate (DDP/FSDP-wrapped when distributed)."""
    optimizer: Any
    scheduler: Any
    loss_fn: Any
    params: list
    stream: Any
    steps: int
    state: TrainState
    resumed_from: int | None
    sharded: bool
    guard: Guard
    t_start: float = 0.0
    tokens_now: int = 0
    first_step_s: float | None = None
    stopped: str | None = None
    log: Any = None
    sinks: Any = None
    progress: Any = None
    stop: Any = None


def train(job: TrainJob) -> dict:
    """One training run: set up, step until done (or stopped), finish. Returns its metrics."""
    tcfg = job.cfg.train
    with speedups(
        job.model,
        device_type=job.accelerator.device.type,
        packing=getattr(job.cfg.data, "packing", False),
        keep_freed_memory=tcfg.keep_freed_memory,
        fused_ops=tcfg.fused_ops,
        compile=tcfg.compile,
        mixed_precision=job.accelerator.mixed_precision,
    ) as speed:
        if job.is_main:
            print(f"[engine] speed-ups: {speed.switches.summary()}", flush=True)
        run = set_up(job, segments=speed.segments)
        with _outputs(run):
            for step in range(run.state.step + 1, run.steps + 1):
                train_step(run, step)
                if run.stopped:
                    break
    return {**finish(run), "speedups": dict(speed.switches.status)}


# ---------------------------------------------------------------- set-up


def set_up(job: TrainJob, *, segments: bool) -> _Run:
    """Data stream, optimizer and schedule, accelerate, then the resume point."""
    cfg, acc, tcfg = job.cfg, job.accelerator, job.cfg.train
    torch.manual_seed(cfg.seed)
    model = job.model
    loss_fn = LOSSES.build(cfg.loss, tokenizer=job.tokenizer)

    # 1. Data: a deterministic micro-batch stream per process; position K says what comes next.
    batches = Batches(
        job.data.splits["train"],
        micro_batch_size=tcfg.micro_batch_size,
        pad_id=job.tokenizer.pad_token_id,
        seed=cfg.seed,
        rank=acc.process_index,
        world=acc.num_processes,
        **_packing(cfg.data, model, segments),
    )
    steps = total_steps(tcfg, len(batches))

    # 2. Optimizer and schedule over the trainable parameters only. The scheduler is not
    #    given to accelerate: it would step it num_processes times per optimizer step.
    optimizer = make_optimizer(tcfg, [p for p in model.parameters() if p.requires_grad], acc.device.type)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(tcfg.schedule, tcfg.warmup_steps, steps))
    model, optimizer = acc.prepare(model, optimizer)
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    sharded = uses_accelerate_state(acc)

    # 3. Resume from the newest intact checkpoint, then re-apply this config's optimizer
    #    hyper-parameters and schedule (train.resume=force may have changed them).
    state, resumed_from = TrainState(), None
    found = _resume_point(job)
    if found is not None:
        state = _restore(found, acc, model, optimizer, scheduler, sharded)
        resumed_from = state.step
        _check_length(steps, state.step)
    reapply_hyperparameters(optimizer, scheduler, tcfg)
    return _Run(
        job=job,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        loss_fn=loss_fn,
        params=params,
        stream=batches.stream(start=state.data_position),
        steps=steps,
        state=state,
        resumed_from=resumed_from,
        sharded=sharded,
        guard=Guard(lr=tcfg.lr, weight_norm=_weight_norm(params, acc, sharded)),
    )


def _packing(data_spec, model, segments: bool) -> dict:
    """Packing/length-grouping options of the data spec.

    Packed rows on an sdpa model attend per example (``segments``: engine/speed/attention.py,
    no mask tensor); on other attention implementations they carry a 4D block mask in the
    model's dtype.
    """
    emb = model.get_input_embeddings().weight
    return {
        "packing": getattr(data_spec, "packing", False),
        "segments": segments,
        "group_by_length": getattr(data_spec, "group_by_length", False),
        "max_length": getattr(data_spec, "max_length", None),
        "mask_dtype": emb.dtype if emb.is_floating_point() else torch.float32,
    }


def reapply_hyperparameters(optimizer, scheduler, tcfg) -> None:
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


def _resume_point(job: TrainJob) -> ckpt_io.Checkpoint | None:
    """The checkpoint to continue from (damaged ones reported and set aside by rank 0), or None."""
    if job.cfg.train.resume == "never":
        return None
    found = ckpt_io.resume_checkpoint(job.run_dir, is_main=job.is_main)
    job.accelerator.wait_for_everyone()
    return found


def _check_length(steps: int, done: int) -> None:
    if steps < done:
        raise ConfigError(
            f"train.max_steps: this run now has {steps} steps, but its checkpoint is at step {done}: "
            f"set train.max_steps to at least {done}, or start over with train.resume=never"
        )


@contextlib.contextmanager
def _outputs(run: _Run):
    """train_log.jsonl, the metric sinks, the progress bar and the signal handler while steps run."""
    from engine.train.loggers import Loggers

    job = run.job
    tcfg = job.cfg.train
    log_path = job.run_dir / "train_log.jsonl"
    if job.is_main:
        ckpt_io.truncate_log(log_path, run.state.step)
        run.log = open(log_path, "a")
        # The config as config.yaml holds it (sample files as ${sample:NAME}): logger records are shared too.
        run.sinks = Loggers(tcfg.loggers, job.run_dir, start_step=run.state.step, config=portable_config(job.cfg.raw))
    run.stop = _StopOnSignal()
    run.progress = _progress(run.steps, run.state.step, disable=not job.is_main)
    run.t_start = time.perf_counter()
    try:
        yield
    finally:
        run.stop.restore()
        run.progress.close()
        if run.log:
            run.log.close()
            run.sinks.close()


# ---------------------------------------------------------------- one optimizer step


def train_step(run: _Run, step: int) -> None:
    """One optimizer step: accumulate, update, check, evaluate, log, maybe checkpoint."""
    job, state, acc = run.job, run.state, run.job.accelerator
    tcfg = job.cfg.train
    t0 = time.perf_counter()
    # 4. Forward/backward over grad_accum micro-batches (kept: an OOM retry reuses them).
    micro = [next(run.stream) for _ in range(tcfg.grad_accum)]
    loss, parts, tokens, state.splits = accumulate(run.model, micro, run.loss_fn, acc, run.optimizer, state.splits)
    # 5. Clip, step, schedule.
    grad_norm = acc.clip_grad_norm_(run.params, tcfg.max_grad_norm) if tcfg.max_grad_norm else None
    run.optimizer.step()
    skipped = getattr(run.optimizer, "step_was_skipped", False)
    if not skipped:
        run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    loss, parts, tokens = _reduce(acc, loss, parts, tokens)

    # 6. Stop before anything is written from weights that blew up (the last checkpoint stays).
    _stop_if_diverged(run, step, loss, None if skipped else grad_norm)

    state.step, state.data_position = step, state.data_position + tcfg.grad_accum
    state.tokens += tokens
    run.tokens_now += tokens
    state.since_eval += loss
    state.since_eval_steps += 1
    dt = time.perf_counter() - t0
    run.first_step_s = run.first_step_s or (time.perf_counter() - run.t_start)
    rec = {
        "step": step,
        "loss": round(loss, 6),
        "lr": run.scheduler.get_last_lr()[0],
        "tokens": tokens,
        "tokens_per_s": round(tokens / dt, 1),
        **{k: v for k, v in parts.items() if k not in CORE_KEYS},
    }
    if state.splits > 1:
        rec["oom_splits"] = state.splits

    # 7. Validation loss, best tracking, early stopping.
    new_best = False
    if tcfg.eval_every and (step % tcfg.eval_every == 0 or step == run.steps):
        new_best, early = _evaluate(job, run.model, run.loss_fn, job.tokenizer, tcfg, state, rec)
        run.stopped = run.stopped or ("early_stopping" if early else None)

    # 8. Log first, then checkpoint: a crash in between only repeats logged steps.
    if run.log:
        run.log.write(json.dumps(rec) + "\n")
        run.log.flush()
        run.sinks.log(rec)
    ckpt_io.crash_point("step", step)
    if run.stop.requested(acc):
        run.stopped = run.stopped or "signal"
    due = tcfg.save_every and step % tcfg.save_every == 0
    if due or new_best or run.stopped or step == run.steps:
        _save(job, run.model, run.optimizer, run.scheduler, state, run.sharded)
    run.progress.update(1)
    if step % tcfg.log_every == 0 or step == run.steps:
        run.progress.set_postfix(loss=f"{loss:.4f}")


# Growth over the start of this process that no healthy run shows (measured on the tiny model
# at lr 1e-2 over 30 steps: weights x1.4, loss falling; at lr 1e9: weights x1.5e10 in one step).
LOSS_GROWTH = 1e3
WEIGHT_GROWTH = 1e3


class Diverged(UserError):
    """Training blew up (non-finite or exploding loss, gradients or weights); nothing was saved from it."""


@dataclass
class Guard:
    """What "training blew up" is measured against: the weights' size at the start and the first loss."""

    lr: float
    weight_norm: float
    first_loss: float | None = None

    def problem(self, loss: float, grad_norm: float | None, weight_norm: float) -> str | None:
        """Why this step's numbers mean divergence, or None."""
        if not math.isfinite(loss):
            return f"loss became {loss}"
        if grad_norm is not None and not math.isfinite(grad_norm):
            return f"the gradient norm became {grad_norm}"
        if not math.isfinite(weight_norm):
            return "the trainable weights became non-finite"
        if self.weight_norm > 0 and weight_norm > WEIGHT_GROWTH * self.weight_norm:
            return f"the trainable weights grew {_num(weight_norm / self.weight_norm)} times larger than at the start"
        first = self.first_loss = loss if self.first_loss is None else self.first_loss
        if abs(loss) > LOSS_GROWTH * max(abs(first), 1.0):
            return f"loss grew from {first:.4g} to {loss:.4g}"
        return None


def _stop_if_diverged(run: _Run, step: int, loss: float, grad_norm) -> None:
    """Raise Diverged (before this step is logged or saved) when the step blew training up.

    Why: with a far too high learning rate a run can go on to a constant loss with weights of
    1e9 and exit 0, writing checkpoints and an adapter of garbage. Every rank sees the same
    reduced loss, global gradient norm and (summed when sharded) weight norm, so all stop together.
    """
    if grad_norm is not None:  # a tensor (a DTensor under FSDP2); None when not clipping or under DeepSpeed
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
    why = run.guard.problem(loss, grad_norm, _weight_norm(run.params, run.job.accelerator, run.sharded))
    if why is None:
        return
    kept = ckpt_io.latest_checkpoint(run.job.run_dir)
    last = f"the last good checkpoint {kept.path.name} is kept" if kept else "no checkpoint was written before it"
    raise Diverged(
        f"step {step}: {why}; training stopped and nothing was saved from this step "
        f"(train.lr={_num(run.guard.lr)} is likely too high; {last})"
    )


def _num(x: float) -> str:
    """1e9 as people write it (not 1e+09)."""
    return re.sub(r"e([+-])0*(\d)", lambda m: f"e{'-' if m.group(1) == '-' else ''}{m.group(2)}", f"{x:.2g}")


def _weight_norm(params: list, acc, sharded: bool) -> float:
    """L2 norm of the trainable weights (over all ranks' shards when sharded)."""
    local = [p.detach().to_local() if hasattr(p, "to_local") else p.detach() for p in params]
    if not local:
        return 0.0
    sq = torch.stack([n.float() for n in torch._foreach_norm(local)]).square().sum()
    if sharded and acc.num_processes > 1:
        sq = acc.reduce(sq.to(acc.device), "sum")
    return float(sq.sqrt())


def accumulate(model, micro: list[dict], loss_fn, acc, optimizer, splits: int = 1):
    """Forward/backward every micro-batch; on CUDA OOM halve the pieces and redo the step.

    Halving the micro-batch and doubling accumulation keeps the effective batch: each
    stream micro-batch is cut into ``splits`` row-slices weighted by their share of rows,
    so the data position (counted in stream micro-batches) keeps its meaning for resume.
    Returns (mean loss, mean numeric loss parts, real tokens, splits now in use).
    """
    while True:
        try:
            return (*_accumulate(model, micro, loss_fn, acc, splits), splits)
        except torch.OutOfMemoryError:
            rows = min(int(b.get("pairs") or b["input_ids"].shape[0]) for b in micro)
            if splits * 2 > rows:
                raise
        optimizer.zero_grad(set_to_none=True)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        splits *= 2
        warnings.warn(
            f"CUDA out of memory: micro-batch cut into {splits} pieces of ~{rows // splits} rows "
            f"(accumulation x{splits}, same effective batch); retrying the step",
            stacklevel=1,
        )


def _accumulate(model, micro: list[dict], loss_fn, acc, splits: int):
    n = len(micro)
    total, tokens, part_sums = 0.0, 0, {}
    pieces = [(piece, w) for batch in micro for piece, w in _split(batch, splits)]
    for i, (batch, weight) in enumerate(pieces):
        tokens += int(batch.pop("real_tokens", 0))
        batch = {k: v.to(acc.device) if torch.is_tensor(v) else v for k, v in batch.items()}
        last = i == len(pieces) - 1
        if acc.distributed_type.value == "DEEPSPEED":
            # DeepSpeed steps inside backward when gradients sync: only on the last piece.
            acc.gradient_state._set_sync_gradients(last)
        with acc.no_sync(model) if not last else nullcontext():
            with acc.autocast():
                loss, parts = forward_loss(model, batch, loss_fn)
            acc.backward(loss * weight / n)
        total += loss.item() * weight / n
        for k, v in (parts or {}).items():
            if isinstance(v, (int, float)) or (torch.is_tensor(v) and v.numel() == 1):
                part_sums[k] = part_sums.get(k, 0.0) + float(v) * weight / n
    return total, part_sums, tokens


def _split(batch: dict, splits: int):
    """Cut a micro-batch into ``splits`` row-slices; yields (piece, share of rows).

    Preference batches (rows [chosen_1..n, rejected_1..n], ``pairs`` = n) are cut along
    pairs: a piece holds chosen_lo..hi and rejected_lo..hi, so no pair is separated.
    """
    if splits == 1:
        yield dict(batch), 1.0
        return
    rows = int(batch["input_ids"].shape[0])
    pairs = batch.get("pairs")
    units = pairs or rows
    real = batch.get("real_tokens")
    bounds = [round(units * j / splits) for j in range(splits + 1)]
    for lo, hi in zip(bounds, bounds[1:], strict=False):
        take = torch.cat([torch.arange(lo, hi), torch.arange(pairs + lo, pairs + hi)]) if pairs else slice(lo, hi)
        piece = {k: v[take] if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == rows else v for k, v in batch.items()}
        if pairs:
            piece["pairs"] = hi - lo
        piece.pop("real_tokens", None)
        # real tokens of the slice (the first piece carries the count when no mask says it).
        mask = piece.get("attention_mask")
        if mask is not None and mask.dim() == 2:
            piece["real_tokens"] = mask.sum()
        elif lo == 0 and real is not None:
            piece["real_tokens"] = real
        yield piece, (hi - lo) / units


def _reduce(acc, loss: float, parts: dict, tokens: int):
    """Mean loss/parts and summed tokens over processes (identical on every rank)."""
    if acc.num_processes == 1:
        return loss, parts, tokens
    keys = sorted(parts)
    t = torch.tensor([loss, *(parts[k] for k in keys)], dtype=torch.float64, device=acc.device)
    t = acc.reduce(t, "mean")
    n = acc.reduce(torch.tensor([tokens], dtype=torch.long, device=acc.device), "sum")
    return float(t[0]), dict(zip(keys, map(float, t[1:]), strict=True)), int(n[0])


# ---------------------------------------------------------------- evaluation


def validation_loss(model, examples, loss_fn, acc, *, micro_batch_size: int, pad_id: int, seed: int, limit: int | None):
    """Token-weighted mean loss over the validation split (sharded across processes)."""
    if not examples:
        return None
    vb = Batches(
        examples, micro_batch_size=micro_batch_size, pad_id=pad_id, seed=seed, rank=acc.process_index, world=acc.num_processes
    )
    n = min(len(vb), limit) if limit else len(vb)
    tot = torch.zeros(2, dtype=torch.float64, device=acc.device)
    model.eval()
    with torch.no_grad():
        for batch in islice(vb.stream(start=0), n):
            batch.pop("real_tokens", None)
            batch = {k: v.to(acc.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            with acc.autocast():
                loss, _ = forward_loss(model, batch, loss_fn)
            count = (batch["labels"][:, 1:] != -100).sum()
            tot += torch.stack([loss.double() * count, count.double()])
    model.train()
    tot = acc.reduce(tot, "sum") if acc.num_processes > 1 else tot
    return float(tot[0] / tot[1]) if tot[1] > 0 else None


def _evaluate(job, model, loss_fn, tokenizer, tcfg, state: TrainState, rec: dict) -> tuple[bool, bool]:
    val = validation_loss(
        model,
        job.data.splits.get("validation") or [],
        loss_fn,
        job.accelerator,
        micro_batch_size=tcfg.micro_batch_size,
        pad_id=tokenizer.pad_token_id,
        seed=job.cfg.seed,
        limit=tcfg.eval_batches,
    )
    if val is not None:
        rec["val_loss"] = round(val, 6)
    value = val if tcfg.metric == "val_loss" else state.since_eval / max(1, state.since_eval_steps)
    state.since_eval, state.since_eval_steps = 0.0, 0
    if value is None:
        return False, False
    if state.best is None or value < state.best - tcfg.min_delta:
        state.best, state.best_step, state.bad_evals = value, state.step, 0
        return True, False
    state.bad_evals += 1
    return False, bool(tcfg.patience and state.bad_evals >= tcfg.patience)


# ---------------------------------------------------------------- checkpoints


def _trainable(acc, model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in acc.unwrap_model(model).named_parameters() if p.requires_grad}


def uses_accelerate_state(acc) -> bool:
    """FSDP/DeepSpeed: no rank holds whole weights or optimizer state; checkpoints go through
    accelerate's save_state/load_state (every rank writes and reads its own shards)."""
    return acc.distributed_type.value in ("FSDP", "DEEPSPEED")


def _save(job, model, optimizer, scheduler, state: TrainState, sharded: bool) -> None:
    """Collective: gather every rank's RNG state (and shards); rank 0 writes the checkpoint, then rotates."""
    acc, tcfg = job.accelerator, job.cfg.train
    rng = ckpt_io.rng_state()
    if acc.num_processes > 1:
        from accelerate.utils import gather_object

        rngs = gather_object([rng])
    else:
        rngs = [rng]
    if sharded:
        if acc.is_main_process:
            ckpt_io.clear_staging(job.run_dir, state.step)
        acc.wait_for_everyone()
        acc.save_state(str(ckpt_io.staging_dir(job.run_dir, state.step) / ckpt_io.SHARDED))
        acc.wait_for_everyone()
    if acc.is_main_process:
        ckpt_io.write_checkpoint(
            job.run_dir,
            state.step,
            tensors=None if sharded else _trainable(acc, model),
            optimizer=None if sharded else optimizer.state_dict(),
            scheduler=scheduler.state_dict(),
            rng=rngs,
            state={
                **asdict(state),
                "config_hash": ckpt_io.config_hash(job.cfg.raw),
                "config": ckpt_io.hashed_config(job.cfg.raw),
                "processes": acc.num_processes,
                "time": time.strftime("%Y-%m-%d %H:%M:%S"),
            },
            staged=sharded,
        )
        protect = {state.best_step} if state.best_step is not None else set()
        ckpt_io.rotate(job.run_dir, tcfg.keep_last, protect)
    acc.wait_for_everyone()


def _restore(found: ckpt_io.Checkpoint, acc, model, optimizer, scheduler, sharded: bool) -> TrainState:
    data = ckpt_io.load_checkpoint(found)
    _load_weights(acc, model, optimizer, data, sharded)
    scheduler.load_state_dict(data["scheduler"])
    rngs = data["rng"]
    if len(rngs) != acc.num_processes:
        warnings.warn(
            f"checkpoint was written by {len(rngs)} processes, now {acc.num_processes}: "
            "RNG streams differ from an uninterrupted run",
            stacklevel=1,
        )
    ckpt_io.set_rng_state(rngs[acc.process_index % len(rngs)])
    fields = TrainState.__dataclass_fields__
    return TrainState(**{k: v for k, v in data["state"].items() if k in fields})


def _load_weights(acc, model, optimizer, data: dict, sharded: bool) -> None:
    """Trainable weights and optimizer state: ours, or accelerate's shards (collective)."""
    if ("sharded_dir" in data) != sharded:
        written, now = ("FSDP/DeepSpeed", "a plain") if "sharded_dir" in data else ("a plain", "an FSDP/DeepSpeed")
        raise UserError(
            f"checkpoint step-{data['state'].get('step')} was written by {written} run and this is {now} run: resume it "
            "with the accelerate launch config it was written with, or start over with train.resume=never"
        )
    if sharded:
        acc.load_state(str(data["sharded_dir"]))
        return
    _load_trainable(acc, model, data["tensors"])
    if optimizer is not None:
        optimizer.load_state_dict(data["optimizer"])


def _load_trainable(acc, model, tensors: dict) -> None:
    own = _trainable(acc, model)
    if set(own) != set(tensors):
        diff = sorted(set(own) ^ set(tensors))[:3]
        raise UserError(
            f"checkpoint does not fit this model's trainable parameters (e.g. {diff}): the adapter or model "
            "changed; start over with train.resume=never or use a new hydra.run.dir"
        )
    with torch.no_grad():
        for name, p in own.items():
            p.copy_(tensors[name].to(p.device, p.dtype))


def _checkpoint_at(run_dir: Path, step: int) -> ckpt_io.Checkpoint:
    return next(c for c in ckpt_io.complete_checkpoints(run_dir) if c.step == step)


# ---------------------------------------------------------------- finish


def finish(run: _Run) -> dict:
    """After the last step: report a signal stop, pick the final weights, save them, summarise."""
    job, state, acc = run.job, run.state, run.job.accelerator
    tcfg = job.cfg.train
    if run.stopped == "signal":
        where = ckpt_io.checkpoints_dir(job.run_dir) / f"step-{state.step}"
        raise Interrupted(
            f"interrupted by {signal.Signals(run.stop.signum).name} after step {state.step}; checkpoint {where} written. "
            f"Re-run the same command with hydra.run.dir={job.run_dir} to continue.",
            run.stop.signum,
        )
    elapsed = time.perf_counter() - run.t_start
    if tcfg.final_adapter == "best" and state.best_step not in (None, state.step):
        best = ckpt_io.load_checkpoint(_checkpoint_at(job.run_dir, state.best_step))
        _load_weights(acc, run.model, None, best, run.sharded)
    adapter_dir = save_adapter(job, run.model)
    log_path = job.run_dir / "train_log.jsonl"
    losses = _read_losses(log_path) if job.is_main else []
    if job.is_main and tcfg.plot:
        from engine.train.loggers import plot

        plot(log_path, job.run_dir / "loss.png")
    return {
        "steps": state.step,
        "resumed_from_step": run.resumed_from,
        "stopped": run.stopped or "completed",
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        f"best_{tcfg.metric}": state.best,
        "best_step": state.best_step,
        "train_seconds": round(elapsed, 2),
        "tokens": state.tokens,
        "tokens_per_s": round(run.tokens_now / elapsed, 1) if elapsed else None,
        "time_to_first_step_s": round(run.first_step_s or 0.0, 2),
        "precision": acc.mixed_precision,
        "device": str(acc.device),
        "processes": acc.num_processes,
        "adapter_dir": shown_path(adapter_dir, job.run_dir) if adapter_dir else None,
    }


def save_adapter(job, model) -> Path | None:
    """PEFT adapter dir (loadable with PeftModel.from_pretrained); full model if no adapter."""
    acc = job.accelerator
    acc.wait_for_everyone()
    inner = acc.unwrap_model(model)
    sharded = uses_accelerate_state(acc)
    state_dict = acc.get_state_dict(model) if sharded else None  # collective: every rank calls it
    out = job.run_dir / ("adapter" if hasattr(inner, "peft_config") else "model")
    if acc.is_main_process:
        with _base_named(inner, job.cfg.model):
            inner.save_pretrained(out, safe_serialization=True, **({"state_dict": state_dict} if sharded else {}))
        if out.name == "model":
            job.tokenizer.save_pretrained(out)
    acc.wait_for_everyone()
    return out


@contextmanager
def _base_named(model, model_spec):
    """PEFT writes where the base was loaded from into adapter_config.json and README.md: the HF
    cache snapshot of a hub model, our conversion cache for a packaged GGUF, always a local path.
    While saving, the base is named as the config names it (hub id, ``package:<pkg>/<file>``,
    a local dir as ``shown_path``) so the adapter dir can be shared; the loaded model is unchanged."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    loaded_from = getattr(base, "name_or_path", None)
    if not loaded_from:  # built from a config (tiny): nothing local to hide
        yield
        return
    name = _base_name(model_spec, str(loaded_from))
    configs = [c for c in getattr(model, "peft_config", {}).values() if c.base_model_name_or_path is not None]
    recorded = [c.base_model_name_or_path for c in configs]
    for c in configs:
        c.base_model_name_or_path = name
    base.name_or_path = base.config.name_or_path = name
    try:
        yield
    finally:
        for c, old in zip(configs, recorded, strict=True):
            c.base_model_name_or_path = old
        base.name_or_path = base.config.name_or_path = loaded_from


def _base_name(model_spec, loaded_from: str) -> str:
    typed = getattr(model_spec, "name_or_path", None)
    if typed and not Path(typed).expanduser().exists():
        return typed  # a hub id
    if getattr(model_spec, "package", None) and getattr(model_spec, "file", None):
        return f"package:{model_spec.package}/{model_spec.file}"
    return shown_path(typed or loaded_from)


def _read_losses(path: Path) -> list[float]:
    if not path.exists():
        return []
    recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r["loss"] for r in recs if "loss" in r]


def _progress(total: int, initial: int, disable: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", disable=disable, dynamic_ncols=True)


def _unwrap(model):
    while hasattr(model, "module"):
        model = model.module
    return model


class _StopOnSignal:
    """SIGTERM / Ctrl-C ask the loop to checkpoint and stop after the current step.

    A second Ctrl-C interrupts at once. Under several processes the flag is agreed on
    (summed over ranks) every step, so all ranks stop at the same step.
    """

    def __init__(self):
        self.signum = 0
        self._old = {}
        try:
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            self._old = {}

    def _handle(self, signum, frame):
        self.signum = signum
        signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)
        print(f"\n[engine] {signal.Signals(signum).name}: finishing this step, writing a checkpoint, exiting", flush=True)

    def requested(self, acc) -> bool:
        if acc.num_processes > 1:
            t = acc.reduce(torch.tensor([int(self.signum)], device=acc.device), "sum")
            if int(t[0]) and not self.signum:
                self.signum = signal.SIGTERM  # another rank got the signal
        return bool(self.signum)

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


# Public names for the GRPO loop (engine/rl/grpo.py): it keeps this loop's checkpoint and
# signal contract, so it uses the same handler and the same checked weight restore.
StopOnSignal = _StopOnSignal
load_trainable = _load_trainable
