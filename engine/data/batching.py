"""How the train stage will batch the prepared training split, measured before any step runs.

Why: a wasteful setting (no packing on very uneven lengths, a micro-batch far wider than the
typical example) shows up as a low padding efficiency in the data line, not minutes into
training. Measured over one epoch of the batching the train stage will use (micro-batch size,
packing, length grouping). The prepare_data stage reports it for the prepared prompts, and
build_index again when retrieved passages go into the training prompts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def batching_metrics(data: Any, *, micro_batch_size: int, pad_id: int | None, seed: int) -> dict:
    """Rows, micro-batches per epoch and padding efficiency of ``data.splits['train']`` (a ``DataBundle``)."""
    from engine.data.collate import Batches  # torch: loaded when data is batched, not when a stage module is imported

    if not isinstance(data.splits["train"], Sequence):  # streamed (data.streaming): its length is unknown
        return {"train_rows": None, "micro_batches_per_epoch": None, "padding_efficiency": None}
    batches = Batches(data.splits["train"], micro_batch_size=micro_batch_size, pad_id=pad_id, seed=seed, **data.batching)
    return {
        "train_rows": len(batches.rows),
        "micro_batches_per_epoch": len(batches),
        "padding_efficiency": batches.padding_efficiency(),
    }


def summary(metrics: dict) -> str:
    """What prepare_data prints: the detected kind (when auto), the split sizes, rejects, padding efficiency."""
    lines = []
    if metrics.get("cache_hit"):
        lines.append(
            f"[engine] data: cache hit {metrics['cache_key']}: the prepared examples are mapped from "
            f"$ENGINE_CACHE/data, not prepared again ({metrics['prepare_seconds']} s)"
        )
    if metrics.get("kind_detected"):
        lines.append(f"[engine] data: kind auto -> {metrics['kind']} ({metrics['kind_detected']})")
    rejected = metrics["rows_rejected"]
    note = f", {rejected} rejected -> rejected.jsonl {metrics['rejected_by_reason']}" if rejected else ""
    if metrics.get("streaming"):
        lines.append(
            f"[engine] data: train streamed from the file (shuffle buffer, tokenized while training) / "
            f"{metrics['validation_examples']} validation / {metrics['test_examples']} test examples{note}"
        )
        return "\n".join(lines)
    lines.append(
        f"[engine] data: {metrics['train_examples']} train / {metrics['validation_examples']} validation / "
        f"{metrics['test_examples']} test examples{note}; padding efficiency {metrics['padding_efficiency']}"
    )
    return "\n".join(lines)
