"""Preference losses: ``dpo``, ``orpo``, ``simpo``. They learn from pairs, not from targets.

A preference batch holds 2n rows, the n chosen conversations then the n rejected ones in the
same order (``batch["pairs"]`` = n; engine/data/collate.py). Every loss here starts from the
log-probability of each answer given its prompt, summed over the answer's labelled tokens
(``sequence_logps``), projected to the vocabulary only at those positions and in chunks, as
``ce`` does; the prompt tokens never reach the LM head.

* ``dpo`` (Rafailov et al. 2023): -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))), with
  optional label smoothing (conservative DPO). The reference is the model before training:
  with a LoRA adapter, the same module with the adapter switched off (``forward_loss`` runs
  that pass under no_grad and hands the result over as ``batch["reference_logps"]``): no
  second copy of the weights in memory.
* ``orpo`` (Hong et al. 2024): NLL of the chosen answer - weight * log sigmoid(log odds ratio),
  the odds taken of the length-normalised probabilities. No reference model.
* ``simpo`` (Meng et al. 2024): -log sigmoid(beta * (avg_c - avg_r) - gamma), the average
  per-token log-probabilities, a target margin gamma. No reference model.

Logged per step (means over the pairs): ``rewards_chosen`` and ``rewards_rejected`` (the
implicit rewards each loss optimises: beta times the policy/reference log ratio for dpo, beta
times the average log-prob for orpo and simpo), ``margin`` (their difference), ``accuracy``
(share of pairs whose chosen reward is higher) and, for orpo, ``nll``.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from engine.loss.ce import LOSSES, CESpec


class DPOSpec(CESpec):
    beta: float = Field(0.1, gt=0)
    """Strength of the pull towards the reference: higher = stay closer to the base model."""
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)
    """Assumed share of pairs whose labels are flipped (conservative DPO); 0 = plain sigmoid DPO."""


class ORPOSpec(CESpec):
    weight: float = Field(0.1, ge=0)
    """lambda in NLL(chosen) - lambda * log sigmoid(log odds ratio); 0.1 as in the ORPO paper."""


class SimPOSpec(CESpec):
    beta: float = Field(2.0, gt=0)
    """Scale of the length-normalised reward difference (2.0-2.5 in the SimPO paper)."""
    gamma: float = Field(1.0, ge=0)
    """Target reward margin: the chosen answer must win by this much before the loss lets go."""


def sequence_logps(hidden, labels, lm_head, chunk_size: int = 2048):
    """(summed log-prob of the labelled tokens per row [B], labelled tokens per row [B]), float32.

    Position t predicts token t+1; only labelled positions are projected to the vocabulary,
    ``chunk_size`` at a time, and the sums are gathered back per row.
    """
    import torch
    import torch.nn.functional as F

    h = hidden[:, :-1, :]
    y = labels[:, 1:]
    keep = y != -100
    rows = keep.nonzero()[:, 0]
    h, y = h[keep], y[keep]
    sums = hidden.new_zeros(labels.shape[0], dtype=torch.float32)
    for i in range(0, y.numel(), chunk_size):
        logits = lm_head(h[i : i + chunk_size]).float()
        token_logps = -F.cross_entropy(logits, y[i : i + chunk_size], reduction="none")
        sums = sums.index_add(0, rows[i : i + chunk_size], token_logps)
    return sums, keep.sum(dim=1)


def _halves(t, n: int):
    return t[:n], t[n : 2 * n]


def _parts(chosen_rewards, rejected_rewards, **more) -> dict[str, float]:
    return {
        "rewards_chosen": chosen_rewards.mean().item(),
        "rewards_rejected": rejected_rewards.mean().item(),
        "margin": (chosen_rewards - rejected_rewards).mean().item(),
        "accuracy": (chosen_rewards > rejected_rewards).float().mean().item(),
        **more,
    }


class _PreferenceLoss:
    needs_reference = False
    """True: ``forward_loss`` puts the reference model's ``sequence_logps`` into ``batch["reference_logps"]``."""

    def __init__(self, spec):
        self.spec = spec
        self.chunk_size = spec.chunk_size

    def sequence_logps(self, hidden, labels, lm_head):
        return sequence_logps(hidden, labels, lm_head, self.chunk_size)

    def __call__(self, hidden, labels, lm_head, batch: dict[str, Any]):
        n = _pairs(batch, labels)
        logps, counts = self.sequence_logps(hidden, labels, lm_head)
        return self.pair_loss(logps, counts.clamp(min=1), n, batch)

    def pair_loss(self, logps, counts, n: int, batch: dict):  # pragma: no cover - every kind defines it
        raise NotImplementedError


class DPO(_PreferenceLoss):
    """Sigmoid DPO against the reference model's log-probs of the same rows."""

    needs_reference = True

    def pair_loss(self, logps, counts, n, batch):
        import torch.nn.functional as F

        beta, eps = self.spec.beta, self.spec.label_smoothing
        ref = batch["reference_logps"].to(logps.device, logps.dtype)
        pi_c, pi_r = _halves(logps, n)
        ref_c, ref_r = _halves(ref, n)
        chosen_rewards = beta * (pi_c - ref_c)
        rejected_rewards = beta * (pi_r - ref_r)
        logits = chosen_rewards - rejected_rewards
        losses = -(1 - eps) * F.logsigmoid(logits) - eps * F.logsigmoid(-logits)
        loss = losses.mean()
        return loss, _parts(chosen_rewards.detach(), rejected_rewards.detach())


class ORPO(_PreferenceLoss):
    """NLL on the chosen answer plus the odds-ratio term; no reference."""

    def pair_loss(self, logps, counts, n, batch):
        import torch
        import torch.nn.functional as F

        avg = logps / counts
        avg_c, avg_r = _halves(avg, n)
        count_c, _ = _halves(counts, n)
        nll = -_halves(logps, n)[0].sum() / count_c.sum()  # token-mean CE of the chosen answers, as ce
        # log odds(p) = log p - log(1 - p), with p the length-normalised probability (kept below 1).
        below_one = avg.clamp(max=-1e-6)
        odds_c, odds_r = _halves(below_one - torch.log1p(-torch.exp(below_one)), n)
        log_odds = odds_c - odds_r
        ratio = F.logsigmoid(log_odds)
        loss = nll - self.spec.weight * ratio.mean()
        return loss, _parts(avg_c.detach(), avg_r.detach(), nll=nll.detach().item(), log_odds=log_odds.detach().mean().item())


class SimPO(_PreferenceLoss):
    """Length-normalised reward margin with a target gap gamma; no reference."""

    def pair_loss(self, logps, counts, n, batch):
        import torch.nn.functional as F

        avg_c, avg_r = _halves(logps / counts, n)
        chosen_rewards, rejected_rewards = self.spec.beta * avg_c, self.spec.beta * avg_r
        loss = -F.logsigmoid(chosen_rewards - rejected_rewards - self.spec.gamma).mean()
        return loss, _parts(chosen_rewards.detach(), rejected_rewards.detach())


def _pairs(batch: dict, labels) -> int:
    """n, for a batch of 2n rows laid out [chosen..., rejected...]; a batch of another kind is a bug upstream."""
    n = batch.get("pairs")
    if not n or 2 * int(n) != labels.shape[0]:
        raise ValueError(
            "a preference loss needs preference batches (rows [chosen..., rejected...] with 'pairs'); "
            "validation refuses a preference loss with other data, so this is a bug: please report it"
        )
    return int(n)


@LOSSES.register("dpo", DPOSpec)
def build_dpo(spec: DPOSpec, *, tokenizer=None):
    """Direct preference optimisation against the base (adapter disabled) as reference."""
    return DPO(spec)


@LOSSES.register("orpo", ORPOSpec)
def build_orpo(spec: ORPOSpec, *, tokenizer=None):
    """Odds-ratio preference optimisation: SFT on chosen plus a preference term, no reference."""
    return ORPO(spec)


@LOSSES.register("simpo", SimPOSpec)
def build_simpo(spec: SimPOSpec, *, tokenizer=None):
    """Simple preference optimisation: length-normalised margin, no reference."""
    return SimPO(spec)


PREFERENCE_KINDS = ("dpo", "orpo", "simpo")
"""Loss kinds that need preference data (validation pairs them with data kind preference)."""
