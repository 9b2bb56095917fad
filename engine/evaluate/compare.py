"""Base vs fine-tuned, on the same prompts, with the same metrics: what the evaluate stage runs.

The stage hands over plain values (``EvalJob``); nothing here knows the run context. For each
model variant (base first when ``compare_base``, then fine-tuned):
  1. generate for the split's prompts -> the text and numeric metrics, then the model-based
     ones (cosine, perplexity), all by name from the metric registry (metrics.py)
  2. behaviour suites (``spec.suites``) -> pass rate per suite and overall
  3. lm-eval tasks (``spec.lm_eval.tasks``)
Fine-tuned numbers land at ``<split>.<metric>``, the base's at ``base.<split>.<metric>``; rank 0
writes generations.jsonl (and suites.jsonl) into the run dir.

With retrieval on (``rag_examples``), a second axis: each model variant also answers the same
examples with the retrieved passages in the prompt, scored with the same metrics at
``finetuned_rag.<split>`` and ``base_rag.<split>`` (suites and lm-eval run on the plain axis only).
"""

from __future__ import annotations

import contextlib
import gc
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.data.templates import render
from engine.evaluate import metrics as M
from engine.evaluate import suites as suite_lib


@dataclass(frozen=True)
class EvalJob:
    """What one evaluation needs, as plain values (the evaluate stage builds it from the run context)."""

    model: Any
    """The fine-tuned model (adapter applied, unwrapped from any distributed wrapper)."""
    tokenizer: Any
    spec: Any
    """The ``eval`` group's EvalSpec."""
    examples: list
    """The examples of ``spec.split``; the first ``spec.max_examples`` are used."""
    template: str
    """The chat template training rendered with: prompts and stop markers come from it."""
    run_dir: Path
    device: Any
    autocast: Any = None
    """A zero-argument context manager factory for mixed precision, or None."""
    loss: Any = None
    """The run's loss spec: its reader gives the expected values (``spec.numeric.expected_value``)."""
    base_model: Any = None
    """Model spec to rebuild the base from after a full fine-tune (there is no adapter to switch off)."""
    quantization: Any = None
    """Quantization spec of that rebuilt base."""
    main: bool = True
    """Rank 0: prints, progress bars, and writes generations.jsonl / suites.jsonl."""
    rag_examples: list | None = None
    """The same examples with retrieved passages in their prompts (engine/retrieval/), or None: retrieval off."""


@dataclass(frozen=True)
class _Inputs:
    """The held-out inputs every variant is evaluated on, prepared once."""

    examples: list
    texts: list[str]
    refs: list[str]
    suites: list
    generate: dict = field(default_factory=dict)
    """``generate`` keyword arguments shared by every call (stops, device, batch size)."""


def evaluate(job: EvalJob) -> dict:
    """Evaluate base (when asked) and fine-tuned; returns the metrics the stage records."""
    from engine.evaluate.generation import stop_config  # torch: imported when evaluating, not with the stage

    spec, tok = job.spec, job.tokenizer
    examples = job.examples[: spec.max_examples]
    if not examples:
        return {"skipped": f"no examples in split '{spec.split}'"}
    eos_ids, stops = stop_config(job.template, tok, spec.stop)

    def prepared(chosen: list, suites: list) -> _Inputs:
        return _Inputs(
            examples=chosen,
            texts=[render(job.template, e.prompt_messages, add_generation_prompt=True, tokenizer=tok) for e in chosen],
            refs=[e.reference for e in chosen],
            suites=suites,
            generate={
                "batch_size": spec.batch_size,
                "eos_ids": eos_ids,
                "stops": stops,
                "device": job.device,
                "autocast": job.autocast,
                "progress": job.main,
            },
        )

    inputs = prepared(examples, [suite_lib.load(name) for name in spec.suites])
    axes = [("", inputs)]
    if job.rag_examples:
        axes.append(("_rag", prepared(job.rag_examples[: spec.max_examples], [])))

    results, generations, suite_rows = {}, {}, []
    for variant, enter in variants(job):
        with enter() as model:
            for suffix, axis in axes:
                name = variant + suffix
                results[name], generations[name], rows = _evaluate_variant(job, axis, model, name, extras=not suffix)
                suite_rows += [{"model": name, **r} for r in rows]
                if job.main:
                    print(f"[engine] evaluate {name}: " + _brief(results[name].get(spec.split, {})), flush=True)

    if job.main:
        more = {"prompt_rag": axes[1][1].texts} if len(axes) > 1 else None
        write_generations(job.run_dir / "generations.jsonl", inputs.texts, inputs.refs, generations, more)
        if suite_rows:
            with open(job.run_dir / "suites.jsonl", "w") as f:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in suite_rows)
    out = results.pop("finetuned")
    out.update(results)  # -> out["base"]
    out["examples"] = len(examples)
    out["stops"] = sorted({*stops, *(tok.convert_ids_to_tokens(eos_ids) or [])})
    return out


def _evaluate_variant(
    job: EvalJob, inputs: _Inputs, model, variant: str, extras: bool = True
) -> tuple[dict, list[str], list[dict]]:
    """All configured evaluations of one model variant: metrics, its answers, suite rows (lm-eval only with ``extras``)."""
    from engine.evaluate.generation import generate

    spec = job.spec
    preds = generate(
        model, job.tokenizer, inputs.texts, max_new_tokens=spec.max_new_tokens, desc=f"generate ({variant})", **inputs.generate
    )
    metrics = M.score(spec.metrics, preds, inputs.refs, tolerance=spec.numeric.tolerance, pattern=spec.numeric.pattern)
    if spec.numeric.expected_value:
        metrics.update(expected_value_scores(job, inputs, model, preds))
    run = M.ModelRun(
        model=model,
        tokenizer=job.tokenizer,
        examples=inputs.examples,
        preds=preds,
        refs=inputs.refs,
        embedding=spec.embedding,
        batch_size=spec.batch_size,
        device=job.device,
        autocast=job.autocast,
    )
    by_model, facts = M.score_with_model(spec.metrics, run)
    metrics.update(by_model)
    result: dict = {spec.split: metrics, **facts}

    rows: list[dict] = []
    if inputs.suites:
        result["suites"], rows = _run_suites(job, inputs, model, variant)
    if spec.lm_eval.tasks and extras:
        from engine.evaluate import harness

        work_dir = job.run_dir / "lm_eval_tasks"
        result["lm_eval"] = harness.run(model, job.tokenizer, spec.lm_eval, work_dir=work_dir, batch_size=spec.batch_size)
    return result, preds, rows


def _run_suites(job: EvalJob, inputs: _Inputs, model, variant: str) -> tuple[dict, list[dict]]:
    """Answer every suite's cases with the training template; score them (pass rates, per-case rows)."""
    from engine.evaluate.generation import generate

    answers = {}
    for suite in inputs.suites:
        texts = [
            render(job.template, suite.prompt_messages(c), add_generation_prompt=True, tokenizer=job.tokenizer)
            for c in suite.cases
        ]
        answers[suite.name] = generate(
            model,
            job.tokenizer,
            texts,
            max_new_tokens=suite.max_new_tokens,
            desc=f"suite {suite.name} ({variant})",
            **inputs.generate,
        )
    return suite_lib.score(inputs.suites, answers, job.spec.refusal_patterns)


def expected_value_scores(job: EvalJob, inputs: _Inputs, model, preds: list[str]) -> dict:
    """The numeric metrics again, of the expected value read at the number in each answer (suffix _ev).

    parse_rate is left out: the expected value exists exactly where the answer states a
    number, so it would repeat the greedy answer's parse rate.
    """
    from engine.evaluate.numeric import expected_values, reader_for

    spec = job.spec
    values = expected_values(
        model,
        job.tokenizer,
        job.template,
        inputs.examples,
        preds,
        reader_for(job.loss, job.tokenizer),
        batch_size=spec.batch_size,
        device=job.device,
        autocast=job.autocast,
    )
    texts = ["" if v is None else f"{v:.6f}" for v in values]
    names = [n for n in M.numeric_names(spec.metrics) if n != "parse_rate"]
    scores = M.score(names, texts, inputs.refs, tolerance=spec.numeric.tolerance, pattern=None)
    return {f"{k}_ev": v for k, v in scores.items() if k in names}


def variants(job: EvalJob) -> list[tuple[str, Any]]:
    """(name, context manager factory yielding the model): base first when asked for, then fine-tuned.

    With an adapter the base is the same module with the adapter switched off (no second
    copy in memory); after a full fine-tune the weights changed in place, so the base is
    built again from its spec and freed afterwards.
    """
    model = job.model
    out: list[tuple[str, Any]] = []
    if job.spec.compare_base:
        if hasattr(model, "disable_adapter"):

            @contextlib.contextmanager
            def base():
                with model.disable_adapter():
                    yield model

            out.append(("base", base))
        else:
            out.append(("base", lambda: _rebuilt_base(job)))
    out.append(("finetuned", lambda: contextlib.nullcontext(model)))
    return out


@contextlib.contextmanager
def _rebuilt_base(job: EvalJob):
    from engine.model import MODELS
    from engine.quantization import QUANTIZATIONS

    fresh, _ = MODELS.build(job.base_model, quantization_config=QUANTIZATIONS.build(job.quantization), progress=False)
    try:
        yield fresh.to(job.device)
    finally:
        del fresh
        gc.collect()


def write_generations(
    path: Path, prompts: list[str], refs: list[str], generations: dict[str, list[str]], more: dict[str, list] | None = None
) -> None:
    """One row per example: prompt, reference, each variant's answer and its ROUGE-L (``more``: extra columns)."""
    with open(path, "w") as f:
        for i, (p, r) in enumerate(zip(prompts, refs, strict=True)):
            row = {"prompt": p, "reference": r, **{k: v[i] for k, v in (more or {}).items()}}
            for variant, preds in generations.items():
                row[variant] = preds[i]
                row[f"{variant}_rougeL"] = round(M.rouge_l(preds[i], r), 4)
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _brief(metrics: dict) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
