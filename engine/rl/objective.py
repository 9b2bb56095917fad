"""The GRPO objective: group-normalised advantages, completion log-probs, the clipped surrogate.

Kept apart from the loop (engine/rl/grpo.py) so each formula reads on its own and a test can
hold it against a direct computation on a fixed batch (tests/test_grpo.py).

For a prompt with a group of G completions o_1..o_G and rewards r_1..r_G, the advantage of
o_i is (r_i - mean(r)) / (std(r) + eps) (or r_i - mean(r) without scaling): the group is its
own baseline, so no value model is trained. Every token t of o_i then gets

    -min(ratio_t * A_i, clip(ratio_t, 1 - eps_clip, 1 + eps_clip) * A_i) + beta * KL_t
    ratio_t = pi(o_t | .) / pi_old(o_t | .)          (pi_old: the policy at sampling time)
    KL_t    = exp(ref_t - logp_t) - (ref_t - logp_t) - 1   (the k3 estimator: unbiased, >= 0)

averaged over the completion's tokens, then over completions (each completion weighs the
same, whatever its length: the GRPO paper's form).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ADVANTAGE_EPS = 1e-4
"""Added to a group's reward std: a group whose rewards all agree gets advantages 0, not NaN."""


def group_advantages(rewards: torch.Tensor, group_size: int, *, scale: bool, eps: float = ADVANTAGE_EPS) -> torch.Tensor:
    """(r - group mean) / (group std + eps) per completion; ``rewards`` is flat, groups consecutive.

    The std is the unbiased one (torch's default, as in the GRPO paper's reference code).
    ``scale=False`` only subtracts the mean: rewards on a meaningful scale keep it, and a group
    whose rewards barely differ is not blown up to unit variance.
    """
    r = rewards.reshape(-1, group_size).to(torch.float32)
    centred = r - r.mean(dim=1, keepdim=True)
    if scale:
        centred = centred / (r.std(dim=1, keepdim=True) + eps)
    return centred.reshape(-1)


def completion_logprobs(model, input_ids, attention_mask, n_completion: int, temperature: float = 1.0) -> torch.Tensor:
    """log pi(token) of the last ``n_completion`` tokens of each row (prompt left-padded before them).

    Positions count real tokens only, as ``generate`` numbered them for a left-padded batch, so
    these are the probabilities the tokens were sampled with. Only the completion positions are
    projected to the vocabulary (``logits_to_keep``). Logits are divided by the sampling
    temperature: the ratio is then taken to the distribution that actually drew the tokens.
    """
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        logits_to_keep=n_completion + 1,
        use_cache=False,
    )
    logits = out.logits[:, :-1].float()
    if temperature != 1.0:
        logits = logits / temperature
    targets = input_ids[:, -n_completion:]
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


@dataclass
class SequenceTerms:
    """Per completion: its loss, its mean KL to the reference, and how many of its tokens were clipped."""

    loss: torch.Tensor
    kl: torch.Tensor
    clipped: torch.Tensor
    tokens: torch.Tensor


def sequence_terms(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_eps: float,
    beta: float,
) -> SequenceTerms:
    """The clipped surrogate (+ beta x k3 KL) averaged over each completion's tokens.

    ``logp``/``old_logp``/``ref_logp`` and ``mask`` are [rows, completion tokens], ``advantages``
    [rows]. A token counts as clipped where the clip took effect (the ratio left
    [1 - eps, 1 + eps] in the direction the advantage pushes).
    """
    mask = mask.to(logp.dtype)
    adv = advantages.to(logp.dtype).unsqueeze(1)
    ratio = torch.exp(logp - old_logp)
    clipped_ratio = ratio.clamp(1 - clip_eps, 1 + clip_eps)
    per_token = -torch.min(ratio * adv, clipped_ratio * adv)
    if ref_logp is not None:
        d = ref_logp - logp
        kl = torch.exp(d) - d - 1
        per_token = per_token + beta * kl
    else:
        kl = torch.zeros_like(logp)
    tokens = mask.sum(1).clamp(min=1)
    hit = ((ratio < 1 - clip_eps) & (adv < 0)) | ((ratio > 1 + clip_eps) & (adv > 0))
    return SequenceTerms(
        loss=(per_token * mask).sum(1) / tokens,
        kl=(kl.detach() * mask).sum(1) / tokens,
        clipped=(hit.to(mask.dtype) * mask).sum(1),
        tokens=mask.sum(1),
    )
