"""The training loop: our own, on HF accelerate, read top to bottom.

Why not HF Trainer: we need exact control of what a checkpoint holds (adapter, optimizer,
scheduler, every rank's RNG, data position, config hash) and when it counts as complete,
so that a run killed at any moment resumes bit-identically (see engine/checkpoint.py); a
loss that projects to the vocabulary only at labelled positions; packed batches with
block-diagonal masks; and OOM recovery that keeps the data position meaningful. Trainer's
checkpoints and data skipping give none of these guarantees. Accelerate still does device
placement, mixed precision and DDP/FSDP/DeepSpeed wrapping.

The loop, per optimizer step: fetch ``grad_accum`` micro-batches from a deterministic
stream -> forward/backward each (split further after a CUDA OOM) -> clip, step, schedule ->
maybe evaluate -> append to train_log.jsonl -> maybe checkpoint.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import signal
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import torch

from engine.data.collate import Batches
from engine.errors import ConfigError, UserError
from engine.loss import LOSSES, forward_loss
from engine.speed.memory import keep_freed_memory
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


def compile_blocks(model) -> int:
    """torch.compile the MLP and norm modules of every decoder block (returns how many).

    Regional, not whole-model: attention (its per-example loop over packed rows, its masks)
    stays eager, and the MLP/norm graphs are the same for every layer, so they compile once
    and are reused (parameters are graph inputs). Shapes vary with batch lengths: dynamic.
    """
    n = 0
    for module in model.modules():
        name = type(module).__name__
        if name.endswith(("MLP", "RMSNorm")) and hasattr(module, "compile"):
            module.compile(dynamic=True)
            n += 1
    return n


def _packing(data_spec, model) -> dict:
    """Packing/length-grouping options of the data spec.

    Packed rows on an sdpa model attend per example (engine/attention.py, no mask tensor);
    on other attention implementations they carry a 4D block mask in the model's dtype.
    """
    from engine.speed.attention import use_segments

    emb = model.get_input_embeddings().weight
    packing = getattr(data_spec, "packing", False)
    return {
        "packing": packing,
        "segments": bool(packing) and use_segments(model),
        "group_by_length": getattr(data_spec, "group_by_length", False),
        "max_length": getattr(data_spec, "max_length", None),
        "mask_dtype": emb.dtype if emb.is_floating_point() else torch.float32,
    }


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


def train(job: TrainJob) -> dict:
    from engine.train.loggers import Loggers, plot

    cfg, acc = job.cfg, job.accelerator
    tcfg = cfg.train
    torch.manual_seed(cfg.seed)
    model = job.model
    tokenizer = job.tokenizer
    loss_fn = LOSSES.build(cfg.loss, tokenizer=tokenizer)

    # 1. Data: a deterministic micro-batch stream per process; position K says what comes next.
    batches = Batches(
        job.data.splits["train"],
        micro_batch_size=tcfg.micro_batch_size,
        pad_id=tokenizer.pad_token_id,
        seed=cfg.seed,
        rank=acc.process_index,
        world=acc.num_processes,
        **_packing(cfg.data, model),
    )
    steps = total_steps(tcfg, len(batches))

    # 2. Optimizer and schedule over the trainable parameters only. The scheduler is not
    #    given to accelerate: it would step it num_processes times per optimizer step.
    params = [p for p in model.parameters() if p.requires_grad]
    if tcfg.keep_freed_memory and acc.device.type == "cpu":
        keep_freed_memory()
    fuse = tcfg.fused_ops and acc.device.type == "cpu"
    if fuse:
        from engine.speed.fused_ops import fused_rope, use_fused_rms_norm

        use_fused_rms_norm(model)
    if tcfg.compile:
        compile_blocks(model)
    optimizer = make_optimizer(tcfg, params, acc.device.type)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(tcfg.schedule, tcfg.warmup_steps, steps))
    model, optimizer = acc.prepare(model, optimizer)
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    sharded = acc.distributed_type.value in ("FSDP", "DEEPSPEED")
    if sharded and job.is_main:
        warnings.warn("checkpoints are not written under FSDP/DeepSpeed yet (no resume); the final adapter is", stacklevel=1)

    # 3. Resume from the latest complete checkpoint (the run dir was checked by the pipeline).
    state = TrainState()
    cfg_hash = ckpt_io.config_hash(cfg.raw)
    found = ckpt_io.latest_checkpoint(job.run_dir) if tcfg.resume != "never" and not sharded else None
    if found is not None:
        state = _restore(found, acc, model, optimizer, scheduler)
    resumed_from = state.step if found is not None else None

    log_path = job.run_dir / "train_log.jsonl"
    log, sinks = None, None
    if job.is_main:
        ckpt_io.truncate_log(log_path, state.step)
        log = open(log_path, "a")
        sinks = Loggers(tcfg.loggers, job.run_dir, start_step=state.step, config=cfg.raw)
    stream = batches.stream(start=state.data_position)
    stop = _StopOnSignal()
    t_start = time.perf_counter()
    tokens_now, first_step_s, stopped = 0, None, None
    progress = _progress(steps, state.step, disable=not job.is_main)

    def save(step: int) -> None:
        if not sharded:
            _save(job, model, optimizer, scheduler, state, cfg_hash)

    fused = contextlib.ExitStack()  # rotary embeddings fused while the loop runs (restored in finally)
    try:
        if fuse:
            fused.enter_context(fused_rope(model))
        for step in range(state.step + 1, steps + 1):
            t0 = time.perf_counter()
            # 4. Forward/backward over grad_accum micro-batches (kept: an OOM retry reuses them).
            micro = [next(stream) for _ in range(tcfg.grad_accum)]
            step_loss, parts, step_tokens, state.splits = accumulate(model, micro, loss_fn, acc, optimizer, state.splits)
            # 5. Clip, step, schedule.
            if tcfg.max_grad_norm:
                acc.clip_grad_norm_(params, tcfg.max_grad_norm)
            optimizer.step()
            if not getattr(optimizer, "step_was_skipped", False):
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            state.step, state.data_position = step, state.data_position + tcfg.grad_accum
            step_loss, parts, step_tokens = _reduce(acc, step_loss, parts, step_tokens)
            state.tokens += step_tokens
            tokens_now += step_tokens
            state.since_eval += step_loss
            state.since_eval_steps += 1
            dt = time.perf_counter() - t0
            first_step_s = first_step_s or (time.perf_counter() - t_start)
            rec = {
                "step": step,
                "loss": round(step_loss, 6),
                "lr": scheduler.get_last_lr()[0],
                "tokens": step_tokens,
                "tokens_per_s": round(step_tokens / dt, 1),
                **{k: v for k, v in parts.items() if k not in CORE_KEYS},
            }
            if state.splits > 1:
                rec["oom_splits"] = state.splits

            # 6. Validation loss, best tracking, early stopping.
            new_best = False
            if tcfg.eval_every and (step % tcfg.eval_every == 0 or step == steps):
                new_best, early = _evaluate(job, model, loss_fn, tokenizer, tcfg, state, rec)
                stopped = stopped or ("early_stopping" if early else None)

            # 7. Log first, then checkpoint: a crash in between only repeats logged steps.
            if log:
                log.write(json.dumps(rec) + "\n")
                log.flush()
                sinks.log(rec)
            ckpt_io.crash_point("step", step)
            if stop.requested(acc):
                stopped = stopped or "signal"
            due = tcfg.save_every and step % tcfg.save_every == 0
            if due or new_best or stopped or step == steps:
                save(step)
            progress.update(1)
            if step % tcfg.log_every == 0 or step == steps:
                progress.set_postfix(loss=f"{step_loss:.4f}")
            if stopped:
                break
    finally:
        from engine.speed.attention import restore_sdpa

        fused.close()
        restore_sdpa(_unwrap(model))
        stop.restore()
        progress.close()
        if log:
            log.close()
            sinks.close()

    if stopped == "signal":
        where = ckpt_io.checkpoints_dir(job.run_dir) / f"step-{state.step}"
        raise Interrupted(
            f"interrupted by {signal.Signals(stop.signum).name} after step {state.step}; checkpoint {where} written. "
            f"Re-run the same command with hydra.run.dir={job.run_dir} to continue.",
            stop.signum,
        )
    elapsed = time.perf_counter() - t_start
    if tcfg.final_adapter == "best" and state.best_step not in (None, state.step):
        _load_trainable(acc, model, ckpt_io.load_checkpoint(_checkpoint_at(job.run_dir, state.best_step))["tensors"])
    adapter_dir = save_adapter(job, model)
    losses = _read_losses(log_path) if job.is_main else []
    if job.is_main and tcfg.plot:
        plot(log_path, job.run_dir / "loss.png")
    return {
        "steps": state.step,
        "resumed_from_step": resumed_from,
        "stopped": stopped or "completed",
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        f"best_{tcfg.metric}": state.best,
        "best_step": state.best_step,
        "train_seconds": round(elapsed, 2),
        "tokens": state.tokens,
        "tokens_per_s": round(tokens_now / elapsed, 1) if elapsed else None,
        "time_to_first_step_s": round(first_step_s or 0.0, 2),
        "precision": acc.mixed_precision,
        "device": str(acc.device),
        "processes": acc.num_processes,
        "adapter_dir": str(adapter_dir) if adapter_dir else None,
    }


# ---------------------------------------------------------------- one optimizer step


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
            rows = min(int(b["input_ids"].shape[0]) for b in micro)
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
    """Cut a micro-batch into ``splits`` row-slices; yields (piece, share of rows)."""
    if splits == 1:
        yield dict(batch), 1.0
        return
    rows = int(batch["input_ids"].shape[0])
    real = batch.get("real_tokens")
    bounds = [round(rows * j / splits) for j in range(splits + 1)]
    for lo, hi in zip(bounds, bounds[1:], strict=False):
        piece = {k: v[lo:hi] if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == rows else v for k, v in batch.items()}
        piece.pop("real_tokens", None)
        # real tokens of the slice (the first piece carries the count when no mask says it).
        mask = piece.get("attention_mask")
        if mask is not None and mask.dim() == 2:
            piece["real_tokens"] = mask.sum()
        elif lo == 0 and real is not None:
            piece["real_tokens"] = real
        yield piece, (hi - lo) / rows


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


def _save(job, model, optimizer, scheduler, state: TrainState, cfg_hash: str) -> None:
    """Collective: gather every rank's RNG state; rank 0 writes the checkpoint, then rotates."""
    acc, tcfg = job.accelerator, job.cfg.train
    rng = ckpt_io.rng_state()
    if acc.num_processes > 1:
        from accelerate.utils import gather_object

        rngs = gather_object([rng])
    else:
        rngs = [rng]
    if acc.is_main_process:
        ckpt_io.write_checkpoint(
            job.run_dir,
            state.step,
            tensors=_trainable(acc, model),
            optimizer=optimizer.state_dict(),
            scheduler=scheduler.state_dict(),
            rng=rngs,
            state={
                **asdict(state),
                "config_hash": cfg_hash,
                "config": ckpt_io.hashed_config(job.cfg.raw),
                "processes": acc.num_processes,
                "time": time.strftime("%Y-%m-%d %H:%M:%S"),
            },
        )
        protect = {state.best_step} if state.best_step is not None else set()
        ckpt_io.rotate(job.run_dir, tcfg.keep_last, protect)
    acc.wait_for_everyone()


def _restore(found: ckpt_io.Checkpoint, acc, model, optimizer, scheduler) -> TrainState:
    data = ckpt_io.load_checkpoint(found)
    _load_trainable(acc, model, data["tensors"])
    optimizer.load_state_dict(data["optimizer"])
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


# ---------------------------------------------------------------- output


def save_adapter(job, model) -> Path | None:
    """PEFT adapter dir (loadable with PeftModel.from_pretrained); full model if no adapter."""
    acc = job.accelerator
    acc.wait_for_everyone()
    inner = acc.unwrap_model(model)
    sharded = acc.distributed_type.value in ("FSDP", "DEEPSPEED")
    state_dict = acc.get_state_dict(model) if sharded else None  # collective: every rank calls it
    out = job.run_dir / ("adapter" if hasattr(inner, "peft_config") else "model")
    if acc.is_main_process:
        inner.save_pretrained(out, safe_serialization=True, **({"state_dict": state_dict} if sharded else {}))
        if out.name == "model":
            job.tokenizer.save_pretrained(out)
    acc.wait_for_everyone()
    return out


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
