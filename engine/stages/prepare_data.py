"""prepare_data: read, clean, split and tokenize the configured data set."""

from engine.stages.registry import STAGES


@STAGES.register("prepare_data")
def prepare_data(ctx) -> dict:
    """Read, clean, split and tokenize the data (rejected rows -> rejected.jsonl).

    Padding efficiency is measured here over one epoch of the batching the train stage
    will use (micro-batch size, packing, length grouping), so a wasteful setting shows up
    before any step runs.
    """
    from engine.data import prepare
    from engine.data.collate import Batches

    tokenizer = ctx.tokenizer()
    ctx.data = prepare(ctx.cfg.data, tokenizer, seed=ctx.cfg.seed, run_dir=ctx.run_dir if ctx.is_main else None)
    if ctx.cfg.retrieval is not None and ctx.cfg.retrieval.kind != "none":
        from engine.stages.rag import with_retrieval

        ctx.data.metrics.update(with_retrieval(ctx))  # top-k passages into the prompts (engine/retrieval/)
    batches = Batches(
        ctx.data.splits["train"],
        micro_batch_size=ctx.cfg.train.micro_batch_size,
        pad_id=tokenizer.pad_token_id,
        seed=ctx.cfg.seed,
        **ctx.data.batching,
    )
    metrics = ctx.data.metrics
    metrics["train_rows"] = len(batches.rows)
    metrics["micro_batches_per_epoch"] = len(batches)
    metrics["padding_efficiency"] = batches.padding_efficiency()
    if ctx.is_main:
        if metrics.get("kind_detected"):
            print(f"[engine] data: kind auto -> {metrics['kind']} ({metrics['kind_detected']})", flush=True)
        rejected = metrics["rows_rejected"]
        note = f", {rejected} rejected -> rejected.jsonl {metrics['rejected_by_reason']}" if rejected else ""
        print(
            f"[engine] data: {metrics['train_examples']} train / {metrics['validation_examples']} validation / "
            f"{metrics['test_examples']} test examples{note}; padding efficiency {metrics['padding_efficiency']}",
            flush=True,
        )
    return metrics


def ensure_data(ctx) -> None:
    """Run prepare_data first when the recipe's stage list leaves it out (train, evaluate ...)."""
    if ctx.data is None:
        ctx.record("prepare_data", prepare_data(ctx))
