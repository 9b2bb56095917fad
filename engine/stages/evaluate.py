"""evaluate: generate on a held-out split and score against the references.

With an adapter and ``eval.compare_base``, the same prompts are also answered with the
adapter disabled, so base and fine-tuned are compared on identical inputs.
"""

from __future__ import annotations

import json

import torch

from engine.stages import STAGES


@STAGES.register("evaluate")
def evaluate(ctx) -> dict:
    """Base vs fine-tuned generation metrics on the held-out split."""
    from engine.metrics import score

    cfg = ctx.cfg.eval
    if ctx.data is None:
        from engine.stages.prepare_data import prepare_data

        ctx.record("prepare_data", prepare_data(ctx))
    examples = ctx.data.splits[cfg.split][: cfg.max_examples]
    if not examples:
        return {"skipped": f"no examples in split '{cfg.split}'"}
    model, tok = ctx.accelerator.unwrap_model(ctx.model()), ctx.tokenizer()
    prompts = [ctx.data.prompt_text(e, tok) for e in examples]
    refs = [e.reference for e in examples]

    results: dict = {}
    runs = {"finetuned": None}
    if cfg.compare_base and hasattr(model, "disable_adapter"):
        runs = {"base": model.disable_adapter, **runs}
    samples = {}
    for name, ctx_manager in runs.items():
        with ctx_manager() if ctx_manager else _null():
            preds = generate(model, tok, prompts, cfg, ctx.accelerator)
        results[name] = {cfg.split: score(cfg.metrics, preds, refs)}
        samples[name] = preds
    if ctx.is_main:
        with open(ctx.run_dir / "generations.jsonl", "w") as f:
            for i, (p, r) in enumerate(zip(prompts, refs, strict=True)):
                row = {"prompt": p, "reference": r, **{k: v[i] for k, v in samples.items()}}
                f.write(json.dumps(row) + "\n")
    # Fine-tuned metrics at the top level (evaluate.test.rougeL), base under evaluate.base.
    out = dict(results.pop("finetuned"))
    out.update(results)
    out["examples"] = len(examples)
    return out


@torch.no_grad()
def generate(model, tok, prompts: list[str], cfg, accelerator) -> list[str]:
    from tqdm.auto import tqdm

    model.eval()
    tok.padding_side = "left"
    outs = []
    for i in tqdm(range(0, len(prompts), cfg.batch_size), desc="generate", disable=not accelerator.is_main_process):
        enc = tok(prompts[i : i + cfg.batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
        enc = {k: v.to(accelerator.device) for k, v in enc.items()}
        with accelerator.autocast():
            gen = model.generate(
                **enc,
                max_new_tokens=cfg.max_new_tokens,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
            )
        outs += tok.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    tok.padding_side = "right"
    return [o.strip() for o in outs]


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False
