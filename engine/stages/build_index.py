"""build_index: embed the retrieval corpus into a FAISS index and score it on the labelled queries.

Writes run_dir/retrieval/index.faiss + meta.json (engine/retrieval/index.py). Without this stage
in the list, prepare_data builds the same index on first use (engine/stages/rag.py); listing it
first makes the build and its scores a step of their own, before any model weight loads (except
for llm_mean_pool, which embeds with the base model, and a documents folder, cut in its tokens).
"""

from __future__ import annotations

from engine.stages.prepare_data import ensure_data
from engine.stages.rag import ensure_index, needs_data
from engine.stages.registry import STAGES


@STAGES.register("build_index")
def build_index(ctx) -> dict:
    """Embed the corpus into a FAISS index (retrieval/) and score it on the labelled queries."""
    if needs_data(ctx.cfg.retrieval) and ctx.data is None:
        ensure_data(ctx)  # the corpus is the training split (prepare_data builds the index on its way)
    return dict(ensure_index(ctx).metrics)
