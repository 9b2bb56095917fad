"""build_index: the retrieval index, scored on the labelled queries, and its passages in the prompts.

Opens or builds the FAISS index (run_dir/retrieval/index.faiss + meta.json) and, when the data is
prepared (listed after prepare_data), puts each example's top-k passages into its prompt: the
training split's too with ``retrieval.in_training``. Evaluate then answers with and without them.
Listed alone (``retrieval.k=0`` and a corpus file), it builds and scores the index before any
model weight loads. The work is engine/retrieval/run.py.
"""

from __future__ import annotations

from engine.context import RunContext
from engine.data.batching import batching_metrics
from engine.retrieval.run import add_passages, open_index
from engine.stages.registry import STAGES


@STAGES.register("build_index", traits=("gives:index",))
def build_index(ctx: RunContext) -> dict:
    """Embed the corpus into a FAISS index (retrieval/), score it, and put its passages into the prompts."""
    cfg, spec, evaluated = ctx.cfg, ctx.cfg.retrieval, ctx.cfg.evaluated_run
    ctx.retrieval = open_index(
        spec,
        run_dir=ctx.run_dir,
        examples=ctx.data.splits["train"] if ctx.data is not None else None,
        earlier_run=evaluated.path if evaluated else None,
        model=lambda: ctx.accelerator.unwrap_model(ctx.model()),
        tokenizer=ctx.tokenizer,
        model_spec=cfg.model,
        main=ctx.is_main,
    )
    metrics = dict(ctx.retrieval.metrics)
    if ctx.data is not None:
        ctx.data, added = add_passages(
            ctx.retrieval,
            spec,
            ctx.data,
            tokenizer=ctx.tokenizer(),
            max_length=cfg.data.max_length,
            train_on_prompt=cfg.data.train_on_prompt,
            run_dir=ctx.run_dir,
            main=ctx.is_main,
        )
        metrics.update(added)
        if spec.k and spec.in_training:  # the padding efficiency of what is trained on now
            pad_id = ctx.tokenizer().pad_token_id
            metrics.update(batching_metrics(ctx.data, micro_batch_size=cfg.train.micro_batch_size, pad_id=pad_id, seed=cfg.seed))
    return metrics
