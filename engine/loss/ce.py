"""``ce``: completion-only cross-entropy, projected to the vocabulary only at labelled positions."""

from __future__ import annotations

from typing import Any

from engine.registry import Registry, Spec

LOSSES = Registry("loss")


class CESpec(Spec):
    chunk_size: int = 2048
    """Labelled positions projected to the vocabulary at a time (bounds logits memory)."""


class CrossEntropy:
    """Mean next-token cross-entropy over positions whose label is not -100."""

    def __init__(self, spec: CESpec):
        self.chunk_size = spec.chunk_size

    def __call__(self, hidden, labels, lm_head, batch: dict[str, Any] | None = None):
        import torch
        import torch.nn.functional as F

        # Position t predicts token t+1.
        h = hidden[:, :-1, :]
        y = labels[:, 1:]
        keep = y != -100
        h, y = h[keep], y[keep]
        n = y.numel()
        if n == 0:
            return hidden.sum() * 0.0, {"ce": 0.0, "tokens": 0}
        total = h.new_zeros((), dtype=torch.float32)
        for i in range(0, n, self.chunk_size):
            logits = lm_head(h[i : i + self.chunk_size]).float()
            total = total + F.cross_entropy(logits, y[i : i + self.chunk_size], reduction="sum")
        loss = total / n
        return loss, {"ce": loss.detach().item(), "tokens": n}


@LOSSES.register("ce", CESpec)
def build_ce(spec: CESpec, *, tokenizer=None):
    """Completion-only cross-entropy."""
    return CrossEntropy(spec)


def forward_loss(model, batch: dict, loss_fn):
    """One forward: hidden states from the model, loss only where labels are set."""
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch.get("position_ids"),
        **({"segment_lengths": batch["segment_lengths"]} if "segment_lengths" in batch else {}),
        output_hidden_states=True,
        logits_to_keep=1,
        use_cache=False,
    )
    inner = model
    while hasattr(inner, "module"):  # DDP / accelerate wrappers
        inner = inner.module
    lm_head = inner.get_output_embeddings()
    return loss_fn(out.hidden_states[-1], batch["labels"], lm_head, batch)
