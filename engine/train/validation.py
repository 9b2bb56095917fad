"""Validation loss during training, best-checkpoint tracking and early stopping."""

from __future__ import annotations

from itertools import islice

import torch

from engine.data.collate import Batches
from engine.loss import forward_loss
from engine.train.job import TrainJob, TrainState


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


def evaluate(job: TrainJob, model, loss_fn, state: TrainState, rec: dict) -> tuple[bool, bool]:
    """Measure ``train.metric`` (val_loss goes into ``rec``); returns (a new best, stop early)."""
    tcfg = job.train
    val = validation_loss(
        model,
        job.data.splits.get("validation") or [],
        loss_fn,
        job.accelerator,
        micro_batch_size=tcfg.micro_batch_size,
        pad_id=job.tokenizer.pad_token_id,
        seed=job.seed,
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
