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
(one optimizer step, numbered comments) and ``finish`` (final weights, summary). What the
GRPO loop shares with it lives beside it: the job and progress types (job.py), optimizer and
schedule (optim.py), the speed switches and outputs around the steps (scaffold.py), signals
(signals.py) and checkpoints and final weights (saving.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from engine.data.collate import Batches
from engine.data.stream import STREAM_REJECTED, StreamBatches, TrainStream
from engine.files import shown_path
from engine.loss import LOSSES
from engine.runs import TRAIN_LOG, read_log
from engine.train import checkpoint as ckpt_io
from engine.train.guard import Guard, weight_norm
from engine.train.job import Run, TrainJob, TrainState
from engine.train.loggers import plot
from engine.train.optim import optimize, total_steps
from engine.train.saving import checkpoint_at, load_weights, resume, save_adapter, save_checkpoint, uses_accelerate_state
from engine.train.scaffold import outputs, speed_switches
from engine.train.signals import raise_if_interrupted
from engine.train.step import accumulate, reduce_across
from engine.train.validation import evaluate

CORE_KEYS = ("step", "loss", "lr", "tokens", "tokens_per_s")


@dataclass(kw_only=True)
class TrainRun(Run):
    """A Run of this loop: its loss, micro-batch stream and divergence guard."""

    job: TrainJob
    state: TrainState
    loss_fn: Any
    stream: Any
    """Micro-batches from the data position on (an endless, deterministic iterator)."""
    guard: Guard
    first_step_s: float | None = None


def train(job: TrainJob) -> dict:
    """One training run: set up, step until done (or stopped), finish. Returns its metrics."""
    with speed_switches(job, packing=job.data.batching.get("packing", False)) as speed:
        run = set_up(job, segments=speed.segments)
        with outputs(run, "train") as run.out:
            for step in range(run.state.step + 1, run.steps + 1):
                train_step(run, step)
                if run.stopped:
                    break
    return {**finish(run), "speedups": dict(speed.switches.status)}


# ---------------------------------------------------------------- set-up


def set_up(job: TrainJob, *, segments: bool) -> TrainRun:
    """Data stream, optimizer and schedule, accelerate, then the resume point."""
    acc, tcfg = job.accelerator, job.train
    torch.manual_seed(job.seed)
    loss_fn = LOSSES.build(job.loss, tokenizer=job.tokenizer)

    # 1. Data: a deterministic micro-batch stream per process; position K says what comes next
    #    (streamed data: the stream's own position, restored from the checkpoint below).
    train = job.data.splits["train"]
    data_options = {
        "micro_batch_size": tcfg.micro_batch_size,
        "pad_id": job.tokenizer.pad_token_id,
        "seed": job.seed,
        "rank": acc.process_index,
        "world": acc.num_processes,
        **_batching(job, segments),
    }
    streamed = isinstance(train, TrainStream)
    batches = None if streamed else Batches(train, **data_options)
    steps = total_steps(tcfg, 0 if streamed else len(batches), tcfg.grad_accum)

    # 2. Optimizer and schedule over the trainable parameters only, prepared by accelerate.
    model, optimizer, scheduler, params = optimize(job, steps)
    model.train()
    sharded = uses_accelerate_state(acc)

    # 3. Resume from the newest intact checkpoint, then re-apply this config's optimizer
    #    hyper-parameters and schedule (train.resume=force may have changed them).
    state, resumed_from = resume(job, model, optimizer, scheduler, sharded=sharded, steps=steps, fresh=TrainState())
    return TrainRun(
        job=job,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        params=params,
        sharded=sharded,
        steps=steps,
        state=state,
        resumed_from=resumed_from,
        loss_fn=loss_fn,
        stream=train.batches(**data_options, state=state.stream) if streamed else batches.stream(start=state.data_position),
        guard=Guard(lr=tcfg.lr, weight_norm=weight_norm(params, acc, sharded)),
    )


def _batching(job: TrainJob, segments: bool) -> dict:
    """The prepared data's batching options (packing, length grouping, max length).

    Packed rows on an sdpa model attend per example (``segments``: engine/speed/attention.py,
    no mask tensor); on other attention implementations they carry a 4D block mask in the
    model's dtype.
    """
    emb = job.model.get_input_embeddings().weight
    batching = job.data.batching
    return {
        "packing": batching.get("packing", False),
        "segments": segments,
        "group_by_length": batching.get("group_by_length", False),
        "max_length": batching.get("max_length"),
        "mask_dtype": emb.dtype if emb.is_floating_point() else torch.float32,
    }


# ---------------------------------------------------------------- one optimizer step


def train_step(run: TrainRun, step: int) -> None:
    """One optimizer step: accumulate, update, check, evaluate, log, maybe checkpoint."""
    job, state, acc, tcfg = run.job, run.state, run.job.accelerator, run.job.train
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
    loss, parts, tokens = reduce_across(acc, loss, parts, tokens)

    # 6. Stop before anything is written from weights that blew up (the last checkpoint stays).
    run.guard.check(run, step, loss, None if skipped else grad_norm)

    state.step, state.data_position = step, state.data_position + tcfg.grad_accum
    if isinstance(run.stream, StreamBatches):
        state.stream = run.stream.state()
    state.tokens += tokens
    run.tokens_now += tokens
    state.since_eval += loss
    state.since_eval_steps += 1
    dt = time.perf_counter() - t0
    run.first_step_s = run.first_step_s or (time.perf_counter() - run.out.t_start)
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
        new_best, early = evaluate(job, run.model, run.loss_fn, state, rec)
        run.stopped = run.stopped or ("early_stopping" if early else None)

    # 8. Log first, then checkpoint: a crash in between only repeats logged steps.
    run.out.record(rec)
    ckpt_io.crash_point("step", step)
    if run.out.stop.requested(acc):
        run.stopped = run.stopped or "signal"
    due = tcfg.save_every and step % tcfg.save_every == 0
    if due or new_best or run.stopped or step == run.steps:
        save_checkpoint(run, protect={state.best_step} if state.best_step is not None else set())
    run.out.advance(step, last=step == run.steps, loss=f"{loss:.4f}")


# ---------------------------------------------------------------- finish


def finish(run: TrainRun) -> dict:
    """After the last step: report a signal stop, pick the final weights, save them, summarise."""
    job, state, acc, tcfg = run.job, run.state, run.job.accelerator, run.job.train
    raise_if_interrupted(run)
    elapsed = time.perf_counter() - run.out.t_start
    if tcfg.final_adapter == "best" and state.best_step not in (None, state.step):
        best = ckpt_io.load_checkpoint(checkpoint_at(job.run_dir, state.best_step))
        load_weights(acc, run.model, None, best, run.sharded)
    adapter_dir = save_adapter(job, run.model, sharded=run.sharded)
    log = read_log(job.run_dir / TRAIN_LOG) if job.is_main else []
    losses = [r["loss"] for r in log if "loss" in r]
    if job.is_main and tcfg.plot:
        plot(log, job.run_dir / "loss.png")
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
        **(_stream_skips(run.stream, job.is_main) if isinstance(run.stream, StreamBatches) else {}),
    }


def _stream_skips(stream: StreamBatches, main: bool) -> dict:
    """Streamed data: the rows skipped so far by reason (every pass), said once on the console."""
    skipped = dict(stream.rejected)
    if main and skipped:
        n = sum(skipped.values())
        print(f"[engine] data: the stream skipped {n} rows {skipped}; its first pass's are in {STREAM_REJECTED}", flush=True)
    return {"stream_rows_skipped": skipped}
