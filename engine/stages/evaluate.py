"""evaluate: the fine-tuned model and its base, on the same prompts, with the same metrics.

Runs at the end of training, or on its own against a finished run (``eval.run_dir``,
recipe eval_run): then that run's config.yaml decides model, data and template, and its
adapter/ is loaded onto the base, so the held-out split is the one it never trained on.

For each model variant (base = adapter disabled, then fine-tuned):
  1. generate for the split's prompts -> text / numeric metrics, cosine, perplexity
  2. behaviour suites (eval.suites)  -> pass rate per suite and overall
  3. lm-eval tasks (eval.lm_eval.tasks)
Fine-tuned numbers land at evaluate.<split>.<metric>, base ones at evaluate.base.<split>...
"""

from __future__ import annotations

import contextlib
import gc
import json
from pathlib import Path

from engine.stages.prepare_data import ensure_data
from engine.stages.registry import STAGES


@STAGES.register("evaluate")
def evaluate(ctx) -> dict:
    """Base vs fine-tuned: generation metrics, behaviour suites, lm-eval."""
    cfg = ctx.cfg.eval
    out: dict = {}
    if ctx.cfg.evaluated_run is not None:  # eval.run_dir, resolved at validation (engine/checks.py)
        out["evaluated_run"] = str(ctx.cfg.evaluated_run.path)
    ensure_data(ctx)
    examples = ctx.data.splits[cfg.split][: cfg.max_examples]
    if not examples:
        return {"skipped": f"no examples in split '{cfg.split}'"}

    from engine.evaluate import suites as suite_lib
    from engine.evaluate.generation import stop_config

    model, tok = ctx.accelerator.unwrap_model(ctx.model()), ctx.tokenizer()
    eos_ids, stops = stop_config(ctx.data.template, tok, cfg.stop)
    prompts = [ctx.data.prompt_text(e, tok) for e in examples]
    refs = [e.reference for e in examples]
    suites = [suite_lib.load(name) for name in cfg.suites]
    common = {"eos_ids": eos_ids, "stops": stops}

    results, generations, suite_rows = {}, {}, []
    for variant, enter in variants(ctx, model):
        with enter() as m:
            res, preds, rows = evaluate_one(ctx, m, tok, variant, examples, prompts, refs, suites, **common)
        results[variant], generations[variant] = res, preds
        suite_rows += [{"model": variant, **r} for r in rows]
        if ctx.is_main:
            print(f"[engine] evaluate {variant}: " + _brief(res.get(cfg.split, {})), flush=True)

    if ctx.is_main:
        write_generations(ctx.run_dir / "generations.jsonl", prompts, refs, generations, cfg.split, results)
        if suite_rows:
            with open(ctx.run_dir / "suites.jsonl", "w") as f:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in suite_rows)
    out.update(results.pop("finetuned"))
    out.update(results)  # -> out["base"]
    out["examples"] = len(examples)
    out["stops"] = sorted({*stops, *(tok.convert_ids_to_tokens(eos_ids) or [])})
    return out


def evaluate_one(ctx, model, tok, variant, examples, prompts, refs, suites, *, eos_ids, stops) -> tuple[dict, list, list]:
    """All configured evaluations of one model variant; returns metrics, generations, suite rows."""
    from engine.evaluate.generation import generate, reference_perplexity
    from engine.evaluate.metrics import score

    cfg, acc = ctx.cfg.eval, ctx.accelerator
    gen = {
        "batch_size": cfg.batch_size,
        "eos_ids": eos_ids,
        "stops": stops,
        "device": acc.device,
        "autocast": acc.autocast,
        "progress": ctx.is_main,
    }
    result_backend: dict = {}
    preds = generate(model, tok, prompts, max_new_tokens=cfg.max_new_tokens, desc=f"generate ({variant})", **gen)
    metrics = score(cfg.metrics, preds, refs, tolerance=cfg.numeric.tolerance, pattern=cfg.numeric.pattern)
    if cfg.numeric.expected_value:
        metrics.update(expected_value_scores(ctx, model, tok, examples, preds, refs))
    if "cosine" in cfg.metrics:
        from engine.evaluate.embeddings import cosine_scores

        sims, backend = cosine_scores(preds, refs, cfg.embedding)
        metrics["cosine"] = round(sum(sims) / len(sims), 4)
        result_backend["cosine_backend"] = backend
    if "perplexity" in cfg.metrics:
        ppl = reference_perplexity(
            model, examples, pad_id=tok.pad_token_id, batch_size=cfg.batch_size, device=acc.device, autocast=acc.autocast
        )
        metrics["perplexity"] = round(ppl, 4) if ppl is not None else None
    result: dict = {cfg.split: metrics, **result_backend}

    rows: list[dict] = []
    if suites:
        from engine.data.templates import render
        from engine.evaluate import suites as suite_lib

        answers = {}
        for suite in suites:
            texts = [
                render(ctx.data.template, suite.prompt_messages(c), add_generation_prompt=True, tokenizer=tok)
                for c in suite.cases
            ]
            answers[suite.name] = generate(
                model, tok, texts, max_new_tokens=suite.max_new_tokens, desc=f"suite {suite.name} ({variant})", **gen
            )
        result["suites"], rows = suite_lib.score(suites, answers, cfg.refusal_patterns)
    if cfg.lm_eval.tasks:
        from engine.evaluate import harness

        result["lm_eval"] = harness.run(
            model, tok, cfg.lm_eval, work_dir=ctx.run_dir / "lm_eval_tasks", batch_size=cfg.batch_size
        )
    return result, preds, rows


def expected_value_scores(ctx, model, tok, examples, preds, refs) -> dict:
    """The numeric metrics again, of the expected value read at the number in each answer (suffix _ev)."""
    from engine.evaluate.metrics import NUMERIC, score
    from engine.evaluate.numeric import expected_values, reader_for

    cfg, acc = ctx.cfg.eval, ctx.accelerator
    values = expected_values(
        model,
        tok,
        ctx.data.template,
        examples,
        preds,
        reader_for(ctx.cfg.loss, tok),
        batch_size=cfg.batch_size,
        device=acc.device,
        autocast=acc.autocast,
    )
    texts = ["" if v is None else f"{v:.6f}" for v in values]
    names = [n for n in cfg.metrics if n in NUMERIC and n != "parse_rate"]
    scores = score(names, texts, refs, tolerance=cfg.numeric.tolerance, pattern=None)
    return {f"{k}_ev": v for k, v in scores.items() if k in names}


def variants(ctx, model):
    """(name, context manager yielding the model): base first when asked for, then fine-tuned.

    With an adapter the base is the same module with the adapter switched off (no second
    copy in memory); after a full fine-tune the weights changed in place, so the base is
    built again from its spec and freed afterwards.
    """
    out = []
    if ctx.cfg.eval.compare_base:
        if hasattr(model, "disable_adapter"):

            @contextlib.contextmanager
            def base():
                with model.disable_adapter():
                    yield model
        else:

            @contextlib.contextmanager
            def base():
                fresh = _build_base(ctx)
                try:
                    yield fresh
                finally:
                    del fresh
                    gc.collect()

        out.append(("base", base))
    out.append(("finetuned", lambda: contextlib.nullcontext(model)))
    return out


def _build_base(ctx):
    from engine.model import MODELS
    from engine.quantization import QUANTIZATIONS

    evaluated = ctx.cfg.evaluated_run
    spec = (evaluated.base_model if evaluated else None) or ctx.cfg.model
    model, _ = MODELS.build(spec, quantization_config=QUANTIZATIONS.build(ctx.cfg.quantization), progress=False)
    return model.to(ctx.accelerator.device)


def write_generations(path: Path, prompts, refs, generations: dict, split: str, results: dict) -> None:
    """One row per example: prompt, reference, each variant's answer and its ROUGE-L."""
    from engine.evaluate.metrics import rouge_l

    with open(path, "w") as f:
        for i, (p, r) in enumerate(zip(prompts, refs, strict=True)):
            row = {"prompt": p, "reference": r}
            for variant, preds in generations.items():
                row[variant] = preds[i]
                row[f"{variant}_rougeL"] = round(rouge_l(preds[i], r), 4)
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _brief(metrics: dict) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
