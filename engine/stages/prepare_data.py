"""prepare_data: read, clean, split and tokenize the configured data set (engine/data/)."""

from engine.context import RunContext
from engine.data import prepare
from engine.data.batching import batching_metrics, summary
from engine.stages.registry import STAGES


@STAGES.register("prepare_data", traits=("gives:data",))
def prepare_data(ctx: RunContext) -> dict:
    """Read, clean, split and tokenize the data (rejected rows -> rejected.jsonl), or map it from the cache.

    Padding efficiency is measured here over one epoch of the batching the train stage
    will use (micro-batch size, packing, length grouping), so a wasteful setting shows up
    before any step runs.
    """
    cfg, tokenizer = ctx.cfg, ctx.tokenizer()
    # Rank 0 prepares (a cache miss fills the cache); the other ranks wait, then map that entry.
    with ctx.accelerator.main_process_first():
        ctx.data = prepare(cfg.data, tokenizer, seed=cfg.seed, run_dir=ctx.run_dir if ctx.is_main else None)
    metrics = ctx.data.metrics
    metrics.update(
        batching_metrics(ctx.data, micro_batch_size=cfg.train.micro_batch_size, pad_id=tokenizer.pad_token_id, seed=cfg.seed)
    )
    if ctx.is_main:
        print(summary(metrics), flush=True)
    return metrics
