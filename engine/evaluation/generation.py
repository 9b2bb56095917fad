"""Batched greedy generation with the training template's stops, and reference perplexity.

Generation must see prompts exactly as training rendered them (same template, same
generation prompt) and must stop where training taught the model to stop: the
template's end-of-turn marker (``<|im_end|>`` for ChatML), found by rendering, not
hard-coded, plus any ``eval.stop`` strings.
"""

from __future__ import annotations

import math

import torch

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
            with autocast() if autocast else _null():
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
    model.eval()
    total_nll, total_tokens = 0.0, 0
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        width = max(len(e.input_ids) for e in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        labels = torch.full((len(chunk), width), -100, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, e in enumerate(chunk):
            n = len(e.input_ids)
            ids[row, :n] = torch.tensor(e.input_ids)
            labels[row, :n] = torch.tensor(e.labels)
            mask[row, :n] = 1
        ids, labels, mask = ids.to(device), labels.to(device), mask.to(device)
        with autocast() if autocast else _null():
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        shift_logits, shift_labels = logits[:, :-1].float(), labels[:, 1:]
        nll = torch.nn.functional.cross_entropy(
            shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1), ignore_index=-100, reduction="sum"
        )
        total_nll += nll.item()
        total_tokens += int((shift_labels != -100).sum())
    if total_tokens == 0:
        return None
    return math.exp(total_nll / total_tokens)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False
