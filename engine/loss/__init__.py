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

# Importing the modules registers their kinds.
from engine.loss import regression  # noqa: F401
from engine.loss.ce import LOSSES, CESpec, CrossEntropy, forward_loss

__all__ = ["LOSSES", "CESpec", "CrossEntropy", "forward_loss"]
