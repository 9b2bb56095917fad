"""The ``loss`` group: what the model is optimised for.

Kinds: ``ce`` (completion-only cross-entropy, here), ``ce_regression`` (CE plus a
regression term on a number in the answer, engine/loss/regression.py) and the preference
losses ``dpo``, ``orpo``, ``simpo`` (pairs of answers, engine/loss/preference.py; a loss
with ``needs_reference`` gets the adapter-disabled model's log-probs from ``forward_loss``).

Interface: ``LOSSES.build(spec, tokenizer=...)`` returns a callable
``(hidden [B,T,H], labels [B,T] with -100 = ignore, lm_head, batch) -> (loss, parts)``;
``parts`` holds plain floats/ints for logging (``ce`` always).

A loss gets the decoder's last hidden states, the labels and the LM head, and projects to
the vocabulary *only at labelled positions*: with a 49k vocabulary, float32 logits for
prompt and padding positions would cost more memory and time than the rest of the step.
"""

from __future__ import annotations

# Importing the modules registers their kinds.
from engine.loss import preference, regression  # noqa: F401
from engine.loss.ce import LOSSES, CESpec, CrossEntropy, forward_loss
from engine.loss.preference import PREFERENCE_KINDS, sequence_logps

__all__ = ["LOSSES", "PREFERENCE_KINDS", "CESpec", "CrossEntropy", "forward_loss", "sequence_logps"]
