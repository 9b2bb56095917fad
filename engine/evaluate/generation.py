"""Batched greedy generation with the training template's stops, and reference perplexity.

Generation must see prompts exactly as training rendered them (same template, same
generation prompt) and must stop where training taught the model to stop: the
template's end-of-turn marker (``<|im_end|>`` for ChatML), found by rendering, not
hard-coded, plus any ``eval.stop`` strings.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch

from engine.data.collate import pad_collate

SENTINEL = "\u2063ENGINE_SENTINEL\u2063"


def end_of_turn(template: str, tokenizer) -> str | None:
    """What the template writes after an assistant message (e.g. ``<|im_end|>``), if anything."""
    from engine.data.templates import render

    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": SENTINEL}]
    text = render(template, msgs, add_generation_prompt=False, tokenizer=tokenizer)
    tail = text.split(SENTINEL, 1)[-1].strip()
    return tail or None


def stop_config(template: str, tokenizer, extra: list[str]) -> tuple[list[int], list[str]]:
    """EOS ids (eos + a single-token end-of-turn marker) and text stops for ``generate``."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    texts = list(extra)
    eot = end_of_turn(template, tokenizer)
    if eot:
        ids = tokenizer(eot, add_special_tokens=False)["input_ids"]
        if len(ids) == 1:
            eos.append(ids[0])
        else:
            texts.append(eot)
    return sorted(set(eos)), texts


def cut_at_stops(text: str, stops: list[str]) -> str:
    """Trim a generation at the first stop string (``generate`` keeps the stop itself)."""
    for s in stops:
        if s and s in text:
            text = text[: text.index(s)]
    return text.strip()


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: list[str],
    *,
    max_new_tokens: int,
    batch_size: int,
    eos_ids: list[int],
    stops: list[str],
    device,
    autocast=None,
    desc: str = "generate",
    progress: bool = True,
) -> list[str]:
    """Greedy answers for ``prompts``, in order; batches of similar length to waste less on padding."""
    from tqdm.auto import tqdm

    model.eval()
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    outs: dict[int, str] = {}
    kwargs = {"stop_strings": stops, "tokenizer": tokenizer} if stops else {}
    try:
        for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress, dynamic_ncols=True):
            idx = order[start : start + batch_size]
            enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
            enc = {k: v.to(device) for k, v in enc.items()}
            with autocast() if autocast else nullcontext():
                gen = model.generate(
                    **enc,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=eos_ids or None,
                    **kwargs,
                )
            texts = tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
            for i, t in zip(idx, texts, strict=True):
                outs[i] = cut_at_stops(t, stops)
    finally:
        tokenizer.padding_side = old_side
    return [outs[i] for i in range(len(prompts))]


@torch.no_grad()
def reference_perplexity(model, examples, *, pad_id: int, batch_size: int, device, autocast=None) -> float | None:
    """exp(mean NLL) of the reference answers given their prompts (teacher forcing).

    Uses each example's training labels, so exactly the tokens the model was trained to
    produce count (the answer and its end-of-turn marker), averaged over all of them.
    """
    from engine.loss import CESpec, CrossEntropy, forward_loss

    # The training loss, reused: the vocabulary projection happens only at labelled positions.
    ce = CrossEntropy(CESpec(kind="ce"))
    model.eval()
    total_nll, total_tokens = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = pad_collate(examples[start : start + batch_size], pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast() if autocast else nullcontext():
            loss, parts = forward_loss(model, batch, ce)
        total_nll += float(loss) * parts["tokens"]
        total_tokens += parts["tokens"]
    if total_tokens == 0:
        return None
    return math.exp(total_nll / total_tokens)
