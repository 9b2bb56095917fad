"""prepare_data: read, clean, split and tokenize the configured data set."""

from engine.stages import STAGES


@STAGES.register("prepare_data")
def prepare_data(ctx) -> dict:
    """Read, clean, split and tokenize the data (rejected rows -> rejected.jsonl)."""
    from engine.data import prepare

    ctx.data = prepare(ctx.cfg.data, ctx.tokenizer(), seed=ctx.cfg.seed, run_dir=ctx.run_dir if ctx.is_main else None)
    return ctx.data.metrics
