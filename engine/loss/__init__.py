"""The ``loss`` group: what the model is optimised for.

Kinds: ``ce`` (completion-only cross-entropy, here) and ``ce_regression`` (CE plus a
regression term on a number in the answer, engine/loss/regression.py).

Interface: ``LOSSES.build(spec, tokenizer=...)`` returns a callable
``(hidden [B,T,H], labels [B,T] with -100 = ignore, lm_head, batch) -> (loss, parts)``;
``parts`` holds plain floats/ints for logging (``ce`` always).

A loss gets the decoder's last hidden states, the labels and the LM head, and projects to
the vocabulary *only at labelled positions*: with a 49k vocabulary, float32 logits for
prompt and padding positions would cost more memory and time than the rest of the step.
"""

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


# Importing the module registers ce_regression.
from engine.loss import regression  # noqa: E402,F401
