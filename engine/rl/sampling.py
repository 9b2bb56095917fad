"""Which prompts a GRPO step uses, and the group of completions sampled for each.

The prompt order is a seeded permutation per epoch, so position K in the stream names the
same prompt in every run of the same config: a checkpoint stores K and resume continues
there. Sampling draws from torch's global generator, whose state the checkpoint also holds.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch

from engine.evaluate.generation import cut_at_stops


class PromptStream:
    """Prompt indices in a seeded order, one fresh permutation per pass (epoch) over ``n`` prompts."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self._epoch, self._order = -1, []

    def at(self, position: int) -> int:
        epoch, i = divmod(position, self.n)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed + epoch)
            self._epoch, self._order = epoch, torch.randperm(self.n, generator=g).tolist()
        return self._order[i]

    def take(self, start: int, k: int) -> list[int]:
        """The prompt indices at positions start .. start + k - 1."""
        return [self.at(p) for p in range(start, start + k)]


@dataclass
class Samples:
    """One step's completions: prompt + completion ids per row (groups consecutive), and their texts."""

    input_ids: torch.Tensor
    """[rows, prompt width + completion width]: left-padded prompt, then the completion."""
    attention_mask: torch.Tensor
    """1 on the prompt's real tokens and on the completion up to its end (the stop token included)."""
    completion_mask: torch.Tensor
    """[rows, completion width]: the tokens that were sampled and count in the loss."""
    texts: list[str]
    """Each completion as the evaluate stage reads an answer: decoded, cut at the stops."""

    @property
    def width(self) -> int:
        return int(self.completion_mask.shape[1])


def completion_mask(tokens: torch.Tensor, eos_ids: list[int], pad_id: int | None) -> torch.Tensor:
    """1 up to and including the first end-of-turn/EOS token; without one, up to the last non-pad token.

    ``generate`` fills a finished row with the pad token, so what follows the end is not part of
    the completion (and neither are trailing pads of a row stopped by a text stop).
    """
    ended = torch.zeros_like(tokens, dtype=torch.bool)
    for e in eos_ids:
        ended |= tokens == e
    if ended.any():
        # positions strictly after the first end token are out
        after = (ended.long().cumsum(1) - ended.long()) > 0
    else:
        after = torch.zeros_like(ended)
    mask = ~after
    if pad_id is not None and pad_id not in eos_ids:
        real = tokens != pad_id
        # trailing pads: no real token at or after the position
        last_real = real.flip(1).long().cumsum(1).flip(1) > 0
        mask &= last_real | ended
    return mask.long()


@torch.no_grad()
def sample(
    model,
    tokenizer,
    prompts: list[str],
    *,
    group_size: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    eos_ids: list[int],
    stops: list[str],
    device,
    autocast=None,
) -> Samples:
    """``group_size`` sampled completions per prompt, in one ``generate`` call (rows p0 x G, p1 x G, ...).

    Sampled from the plain softmax at ``temperature`` (top-k off, nucleus ``top_p``), stopping
    at the template's end of turn as evaluation does, so the texts scored here are the kind the
    evaluate stage scores.
    """
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = old_side
    enc = {k: v.to(device) for k, v in enc.items()}
    kwargs = {"stop_strings": stops, "tokenizer": tokenizer} if stops else {}
    with autocast() if autocast else nullcontext():
        out = model.generate(
            **enc,
            do_sample=True,
            temperature=temperature,
            top_p=top_p,
            top_k=0,
            num_return_sequences=group_size,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=eos_ids or None,
            **kwargs,
        )
    width = enc["input_ids"].shape[1]
    completion = out[:, width:]
    mask = completion_mask(completion, eos_ids, tokenizer.pad_token_id)
    prompt_mask = enc["attention_mask"].repeat_interleave(group_size, dim=0)
    texts = [
        cut_at_stops(tokenizer.decode(row[: int(m.sum())], skip_special_tokens=True), stops)
        for row, m in zip(completion, mask, strict=True)
    ]
    return Samples(
        input_ids=out,
        attention_mask=torch.cat([prompt_mask, mask], dim=1),
        completion_mask=mask,
        texts=texts,
    )
