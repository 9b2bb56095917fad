"""The adapter QA matrix: one prompt suite over the base, each adapter and chosen blends.

Why through the backend (and not the evaluate stage's batched ``model.generate``): the
numbers are those of the model as it is served — the same chat template, the same adapter
switching and blending, the same decoding loop — and latency (time to first token,
tokens/s) is only meaningful for that path. Why no HTTP: the routes add nothing to quality
and only noise to latency; the ``Backend`` protocol is what they drive too.

Each row answers every prompt greedily (temperature 0, a fixed seed), so a rerun gives the
same table and rows differ only by their adapter set. Prompts: the held-out split's
(scored against their references with the evaluate package's text metrics) and the behaviour
suites' (scored by their checks: pass rate per suite and overall).

Latency per row, over all its answers: time to first token p50 (prompt processing plus the
first token), tokens/s p50 (per answer, the tokens after the first over the time after the
first: the decode rate, as bench/serve_load.py counts it), and the row's total seconds.

``adapter_matrix`` is the adapter_matrix stage's work: the prompts from the prepared data and
``eval``, the ``serve`` preset's backend opened as the serve stage opens it, the rows, the files.
"""

from __future__ import annotations

import csv
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.data import DataBundle
from engine.errors import UserError
from engine.evaluate import metrics as M
from engine.evaluate import suites as suite_lib
from engine.evaluate.spec import EvalSpec
from engine.serve import ServeSpec
from engine.serve.backend import AdapterScale, Backend, BackendSource, GenerateRequest
from engine.serve.backends import open_backend

SEED = 0


@dataclass(frozen=True)
class Row:
    """One row of the matrix: a label and the adapter set its answers are made with."""

    name: str
    kind: str = "base"
    """``base``, ``adapter`` (one adapter at scale 1) or ``blend`` (a configured set with scales)."""
    adapters: tuple[AdapterScale, ...] = ()


@dataclass(frozen=True)
class HeldOut:
    """A held-out prompt: the conversation up to the answer, and the reference answer."""

    messages: list[dict]
    reference: str


@dataclass(frozen=True)
class MatrixJob:
    """What one matrix run needs, as plain values (the adapter_matrix stage builds it)."""

    backend: Backend
    rows: list[Row]
    held_out: list[HeldOut]
    max_tokens: int
    """Answer length for held-out prompts (suites use their own ``max_new_tokens``)."""
    metrics: list[str] = field(default_factory=lambda: ["token_f1", "rougeL"])
    suites: list = field(default_factory=list)
    """Loaded ``engine.evaluate.suites.Suite`` objects."""
    refusal_patterns: list[str] = field(default_factory=list)
    stop: tuple[str, ...] = ()
    progress: bool = True


def adapter_matrix(
    spec: ServeSpec,
    source: BackendSource,
    *,
    ev: EvalSpec,
    data: DataBundle,
    tokenizer: Callable[[], Any],
    out_dir: Path,
    main: bool = True,
) -> dict:
    """Open the preset's backend, run the matrix over it, write its files; returns the stage's metrics.

    Args:
        spec: the serve preset (backend, adapters, ``matrix.blends``, ``matrix.metrics``).
        source: the base and the evaluated run whose adapter is a row too.
        ev: the eval group: ``split``, ``max_examples``, ``max_new_tokens``, ``suites``, stops, refusals.
        data: the prepared data (its held-out split and its template's end of turn, a stop).
        tokenizer: the run's tokenizer, loaded only once there is something to ask.
        out_dir: the run dir for adapter_matrix.json / .csv / .jsonl.
        main: print progress and write the files (rank 0).
    """
    from engine.evaluate.generation import end_of_turn  # imports torch

    examples = data.splits[ev.split][: ev.max_examples]
    suites = [suite_lib.load(name) for name in ev.suites]
    if not examples and not suites:
        raise UserError(
            f"adapter_matrix: the {ev.split} split is empty and eval.suites is []; nothing to ask. "
            "Pick another eval.split or add eval.suites=[format,facts,safety]"
        )
    eot = end_of_turn(data.template, tokenizer())
    backend = open_backend(spec, source).backend
    try:
        job = MatrixJob(
            backend=backend,
            rows=rows_for([a.name for a in backend.adapters()], spec.matrix.blends),
            held_out=[HeldOut(e.prompt_messages, e.reference) for e in examples],
            max_tokens=ev.max_new_tokens,
            metrics=list(spec.matrix.metrics),
            suites=suites,
            refusal_patterns=list(ev.refusal_patterns),
            stop=tuple(dict.fromkeys([*ev.stop, *([eot] if eot else [])])),
            progress=main,
        )
        result = run_matrix(job)
    finally:
        backend.close()
    about = {
        "backend": spec.kind,
        "model": backend.model_id,
        "split": ev.split,
        "held_out": result["held_out"],
        "suites": [s.name for s in suites],  # names, not the paths eval.suites may give
        "suite_prompts": result["suite_prompts"],
        "metrics": list(spec.matrix.metrics),
        "max_tokens": ev.max_new_tokens,
        "decoding": "greedy (temperature 0)",
    }
    files = write_matrix(result, out_dir, about=about) if main else {}
    return {**about, "rows": {r["row"]: {k: v for k, v in r.items() if k != "row"} for r in result["rows"]}, **files}


def rows_for(adapters: list[str], blends: dict[str, dict[str, float]]) -> list[Row]:
    """base, each adapter alone at scale 1, then each blend: the matrix's rows in order.

    Raises ``UserError`` when a blend names an adapter that is not loaded, or a label repeats.
    """
    rows = [Row("base"), *(Row(name, "adapter", (AdapterScale(name, 1.0),)) for name in adapters)]
    for label, scales in blends.items():
        if label in {r.name for r in rows}:
            raise UserError(f"serve.matrix.blends.{label}: the label is taken by the base or an adapter; pick another")
        if not scales:
            raise UserError(f"serve.matrix.blends.{label}: empty; give adapters and scales, e.g. {{a: 0.5, b: 0.5}}")
        missing = [n for n in scales if n not in adapters]
        if missing:
            loaded = ", ".join(adapters) or "none (set serve.adapters or eval.run_dir)"
            raise UserError(f"serve.matrix.blends.{label}: adapter {missing[0]!r} is not loaded; loaded: {loaded}")
        rows.append(Row(label, "blend", tuple(AdapterScale(n, float(s)) for n, s in scales.items())))
    return rows


def run_matrix(job: MatrixJob) -> dict:
    """Answer every prompt with every row; returns ``{"rows": [...], "answers": [...]}``.

    ``rows`` holds one dict per row (label, kind, adapter scales, the text metrics, suite pass
    rates, latency); ``answers`` one dict per prompt (its source, the user's text, the reference
    and each row's answer), for adapter_matrix.jsonl.
    """
    backend = job.backend
    prompts = [("held_out", str(i), p.messages, p.reference, job.max_tokens) for i, p in enumerate(job.held_out)]
    for suite in job.suites:
        prompts += [(suite.name, c.id, suite.prompt_messages(c), None, suite.max_new_tokens) for c in suite.cases]
    ids = [backend.render_chat(messages) for _, _, messages, _, _ in prompts]
    answers: dict[str, list[str]] = {}
    out_rows = []
    for row in job.rows:
        t0 = time.perf_counter()
        texts, firsts, rates, tokens = [], [], [], 0
        for (_, _, _, _, max_tokens), prompt_ids in zip(prompts, ids, strict=True):
            text, first, rate, n = _timed(backend, prompt_ids, max_tokens, row.adapters, job.stop)
            texts.append(text)
            tokens += n
            if first is not None:
                firsts.append(first)
            if rate is not None:
                rates.append(rate)
        seconds = time.perf_counter() - t0
        answers[row.name] = texts
        out_rows.append(_score(job, row, prompts, texts) | _latency(firsts, rates, tokens, seconds))
        if job.progress:
            print(f"[engine] adapter_matrix {row.name}: " + _brief(out_rows[-1]), flush=True)
    listed = [
        {
            "source": source,
            "id": case_id,
            "prompt": messages[-1]["content"],
            "reference": reference,
            "answers": {name: texts[i] for name, texts in answers.items()},
        }
        for i, (source, case_id, messages, reference, _) in enumerate(prompts)
    ]
    return {"rows": out_rows, "answers": listed, "held_out": len(job.held_out), "suite_prompts": len(prompts) - len(job.held_out)}


def _timed(backend: Backend, prompt_ids: list[int], max_tokens: int, adapters, stop) -> tuple:
    """(answer, seconds to the first token, decode tokens/s, tokens) of one greedy answer."""
    budget = min(max_tokens, backend.context_length - len(prompt_ids))
    if budget < 1:  # the prompt fills the context: no answer (scored as empty)
        return "", None, None, 0
    request = GenerateRequest(prompt_ids, budget, temperature=0.0, seed=SEED, stop=tuple(stop), adapters=tuple(adapters))
    start = time.perf_counter()
    first = last = None
    parts, n = [], 0
    for piece in backend.generate(request):
        if piece.token_ids:
            now = time.perf_counter()
            first = now if first is None else first
            last = now
            n += len(piece.token_ids)
        parts.append(piece.text)
    ttft = None if first is None else first - start
    rate = (n - 1) / (last - first) if n >= 2 and last > first else None
    return "".join(parts).strip(), ttft, rate, n


def _score(job: MatrixJob, row: Row, prompts, texts: list[str]) -> dict:
    held = len(job.held_out)
    scores = M.score(job.metrics, texts[:held], [p.reference for p in job.held_out]) if held else {}
    out = {
        "row": row.name,
        "kind": row.kind,
        "adapters": {a.name: a.scale for a in row.adapters},
        **scores,
    }
    if job.suites:
        answers, i = {}, held
        for suite in job.suites:
            answers[suite.name] = texts[i : i + len(suite.cases)]
            i += len(suite.cases)
        out["suites"], _ = suite_lib.score(job.suites, answers, job.refusal_patterns)
    return out


def _latency(firsts: list[float], rates: list[float], tokens: int, seconds: float) -> dict:
    return {
        "ttft_p50_s": round(statistics.median(firsts), 4) if firsts else None,
        "tokens_per_s_p50": round(statistics.median(rates), 1) if rates else None,
        "tokens": tokens,
        "seconds": round(seconds, 2),
    }


def _brief(row: dict) -> str:
    parts = [f"{k} {v:.4f}" for k, v in row.items() if isinstance(v, float) and k not in LATENCY]
    if row.get("suites"):
        parts.append(f"suites {row['suites'].get('overall')}")
    parts.append(f"ttft p50 {row['ttft_p50_s']} s, {row['tokens_per_s_p50']} tokens/s, {row['seconds']} s")
    return ", ".join(parts)


LATENCY = ("ttft_p50_s", "tokens_per_s_p50", "tokens", "seconds")


def write_matrix(result: dict, out_dir: Path, *, about: dict) -> dict:
    """adapter_matrix.json (rows + what was run), .csv (one line per row), .jsonl (every answer);
    returns their names in ``out_dir`` (no local path: metrics.json travels with the run dir).

    Args:
        result: what ``run_matrix`` returned.
        out_dir: the run dir.
        about: what the rows were run on (backend, model, prompt counts, metric names); no local paths.
    """
    rows = result["rows"]
    (out_dir / "adapter_matrix.json").write_text(json.dumps({**about, "rows": rows}, indent=2, ensure_ascii=False) + "\n")
    with open(out_dir / "adapter_matrix.jsonl", "w") as f:
        f.writelines(json.dumps(a, ensure_ascii=False) + "\n" for a in result["answers"])
    suite_names = list(dict.fromkeys(k for r in rows for k in r.get("suites", {})))
    metric_names = list(dict.fromkeys(k for r in rows for k in r if k not in ("row", "kind", "adapters", "suites", *LATENCY)))
    header = ["row", "kind", "adapters", *metric_names, *(f"suite_{s}" for s in suite_names), *LATENCY]
    with open(out_dir / "adapter_matrix.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for r in rows:
            scales = " ".join(f"{n}={s:g}" for n, s in r["adapters"].items())
            suites = r.get("suites", {})
            w.writerow(
                [r["row"], r["kind"], scales, *(r.get(m) for m in metric_names), *(suites.get(s) for s in suite_names)]
                + [r.get(k) for k in LATENCY]
            )
    return {"files": ["adapter_matrix.json", "adapter_matrix.csv", "adapter_matrix.jsonl"]}
