"""adapter_matrix: the QA matrix — base, each adapter and chosen blends on one prompt suite.

Builds the ``serve`` preset's backend as the serve stage does (``open_backend``: serve.adapters
and the run of ``eval.run_dir`` loaded) and runs engine/serve/matrix.py over it: the held-out
split's prompts (``eval.split``, ``eval.max_examples``, ``eval.max_new_tokens``) and the behaviour
suites (``eval.suites``), greedy, for the base, every loaded adapter alone and every blend of
``serve.matrix.blends``. Writes adapter_matrix.json / .csv / .jsonl; the report stage (run
after it) turns the json into its "Adapter QA matrix" table.
"""

from __future__ import annotations

from engine.stages.prepare_data import ensure_data
from engine.stages.registry import STAGES


@STAGES.register("adapter_matrix")
def adapter_matrix(ctx) -> dict:
    """Quality (text metrics, suite pass rates) and latency (TTFT, tokens/s) per adapter set."""
    from engine.errors import UserError
    from engine.evaluate import suites as suite_lib
    from engine.evaluate.generation import end_of_turn
    from engine.serve.matrix import HeldOut, MatrixJob, rows_for, run_matrix, write_matrix
    from engine.stages.serve import open_backend

    ensure_data(ctx)
    ev, spec = ctx.cfg.eval, ctx.cfg.serve
    examples = ctx.data.splits[ev.split][: ev.max_examples]
    suites = [suite_lib.load(name) for name in ev.suites]
    if not examples and not suites:
        raise UserError(
            f"adapter_matrix: the {ev.split} split is empty and eval.suites is []; nothing to ask. "
            "Pick another eval.split or add eval.suites=[format,facts,safety]"
        )
    eot = end_of_turn(ctx.data.template, ctx.tokenizer())
    opened = open_backend(ctx)
    backend = opened.backend
    try:
        loaded = [a.name for a in backend.adapters()]
        job = MatrixJob(
            backend=backend,
            rows=rows_for(loaded, spec.matrix.blends),
            held_out=[HeldOut(e.prompt_messages, e.reference) for e in examples],
            max_tokens=ev.max_new_tokens,
            metrics=list(spec.matrix.metrics),
            suites=suites,
            refusal_patterns=list(ev.refusal_patterns),
            stop=tuple(dict.fromkeys([*ev.stop, *([eot] if eot else [])])),
            progress=ctx.is_main,
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
    files = write_matrix(result, ctx.run_dir, about=about) if ctx.is_main else {}
    return {**about, "rows": {r["row"]: {k: v for k, v in r.items() if k != "row"} for r in result["rows"]}, **files}
