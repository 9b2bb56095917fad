"""Forward/backward over one optimizer step's micro-batches, surviving a CUDA out-of-memory.

Halving the micro-batch and doubling accumulation keeps the effective batch: each stream
micro-batch is cut into ``splits`` row-slices weighted by their share of rows, so the data
position (counted in stream micro-batches) keeps its meaning for resume.
"""

from __future__ import annotations

import gc
import warnings
from contextlib import nullcontext

import torch

from engine.loss import forward_loss


def accumulate(model, micro: list[dict], loss_fn, acc, optimizer, splits: int = 1):
    """Forward/backward every micro-batch; on CUDA OOM halve the pieces and redo the step.

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
    pieces = [(piece, w) for batch in micro for piece, w in split_batch(batch, splits)]
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


def split_batch(batch: dict, splits: int):
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


def reduce_across(acc, loss: float, parts: dict, tokens: int):
    """Mean loss/parts and summed tokens over processes (identical on every rank)."""
    if acc.num_processes == 1:
        return loss, parts, tokens
    keys = sorted(parts)
    t = torch.tensor([loss, *(parts[k] for k in keys)], dtype=torch.float64, device=acc.device)
    t = acc.reduce(t, "mean")
    n = acc.reduce(torch.tensor([tokens], dtype=torch.long, device=acc.device), "sum")
    return float(t[0]), dict(zip(keys, map(float, t[1:]), strict=True)), int(n[0])
