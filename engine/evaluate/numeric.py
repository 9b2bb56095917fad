"""Expected-value readout of a numeric answer (``eval.numeric.expected_value``).

Greedy text states the single likeliest digit at each place; a model trained with
``ce_regression`` is trained on the *expected* value under its digit/sign distributions,
which is the prediction that minimises squared error. This reads exactly that quantity
back: the model's own greedy answer is fed in teacher-forced, and at the positions of the
number in it the expected value is computed with the loss's reader (engine/loss/regression.py).
Both readouts are scored side by side (``mae`` vs ``mae_ev`` ...), for any loss, so a
CE-only run and a CE + regression run are compared on the same footing.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from engine.data import tokenize
from engine.data.collate import pad_collate


def reader_for(loss_spec, tokenizer):
    """The run's ce_regression reader, or one with default settings for any other loss."""
    from engine.loss.regression import CERegression, RegressionSpec

    if getattr(loss_spec, "kind", None) != "ce_regression":
        loss_spec = RegressionSpec(kind="ce_regression")
    return CERegression(loss_spec, tokenizer)


@torch.no_grad()
def expected_values(
    model,
    tokenizer,
    template: str,
    examples,
    answers: list[str],
    reader,
    *,
    batch_size: int,
    device,
    autocast=None,
    max_length: int = 4096,
) -> list[float | None]:
    """Per example: the expected value of the number in ``answers[i]`` given its prompt (None: no number)."""
    from engine.loss import forward_loss

    model.eval()
    rows = [
        tokenize(template, [*e.prompt_messages, {"role": "assistant", "content": a}], tokenizer, max_length, False)[0]
        for e, a in zip(examples, answers, strict=True)
    ]

    # The training forward, reused: hidden states, then the reader instead of a loss.
    def read(hidden, labels, lm_head, _batch):
        return reader.read(hidden, labels, lm_head)

    out: list[float | None] = []
    for start in range(0, len(rows), batch_size):
        batch = pad_collate(rows[start : start + batch_size], tokenizer.pad_token_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast() if autocast else nullcontext():
            out += forward_loss(model, batch, read)
    return out
