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
    """One forward: hidden states from the model, loss only where labels are set.

    A loss with ``needs_reference`` (dpo) also gets ``batch["reference_logps"]``: the same
    rows through the model with its adapter switched off, without gradients (see
    ``reference_logps``).
    """
    if getattr(loss_fn, "needs_reference", False) and "reference_logps" not in batch:
        batch = {**batch, "reference_logps": reference_logps(model, batch, loss_fn)}
    hidden, lm_head = _hidden(model, batch)
    return loss_fn(hidden, batch["labels"], lm_head, batch)


def reference_logps(model, batch: dict, loss_fn):
    """Per-row summed log-probs of the labelled tokens under the reference model, no grad.

    The reference is the base: the same module with its PEFT adapter disabled for the
    duration of one forward, so no second copy of the weights is held. The unwrapped model
    is used (a DDP wrapper would wait for gradients this pass never produces).
    """
    import torch

    inner = _unwrap(model)
    if not hasattr(inner, "disable_adapter"):
        from engine.errors import ConfigError

        raise ConfigError(
            "loss: dpo compares against the base model with the adapter switched off, but this model has no "
            "adapter; use adapter=lora (or another adapter), or a loss without a reference (orpo, simpo)"
        )
    with torch.no_grad(), inner.disable_adapter():
        hidden, lm_head = _hidden(inner, batch)
        logps, _ = loss_fn.sequence_logps(hidden, batch["labels"], lm_head)
    return logps.detach()


def _hidden(model, batch: dict):
    """The decoder's last hidden states (no vocabulary projection: the loss does it) and the LM head."""
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch.get("position_ids"),
        **({"segment_lengths": batch["segment_lengths"]} if "segment_lengths" in batch else {}),
        output_hidden_states=True,
        logits_to_keep=1,
        use_cache=False,
    )
    return out.hidden_states[-1], _unwrap(model).get_output_embeddings()


def _unwrap(model):
    while hasattr(model, "module"):  # DDP / accelerate wrappers
        model = model.module
    return model
