"""adapter_matrix: the QA matrix — base, each adapter and chosen blends on one prompt suite.

``engine.serve.matrix.adapter_matrix`` opens the ``serve`` preset's backend as the serve stage
does (serve.adapters and the run of ``eval.run_dir`` loaded) and asks it the prepared held-out
split's prompts (``eval.split``, ``eval.max_examples``, ``eval.max_new_tokens``) and the
behaviour suites (``eval.suites``), greedy, for the base, every loaded adapter alone and every
blend of ``serve.matrix.blends``. Writes adapter_matrix.json / .csv / .jsonl; the report stage
(run after it) turns the json into its "Adapter QA matrix" table. Needs prepare_data before it.
"""

from __future__ import annotations

from engine.context import RunContext
from engine.serve.matrix import adapter_matrix as run_adapter_matrix
from engine.stages.registry import STAGES


@STAGES.register("adapter_matrix", traits=("needs:data",))
def adapter_matrix(ctx: RunContext) -> dict:
    """Quality (text metrics, suite pass rates) and latency (TTFT, tokens/s) per adapter set."""
    cfg = ctx.cfg
    source = ctx.backend_source()
    return run_adapter_matrix(
        cfg.serve, source, ev=cfg.eval, data=ctx.data, tokenizer=ctx.tokenizer, out_dir=ctx.run_dir, main=ctx.is_main
    )
