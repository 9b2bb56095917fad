"""train: fine-tune the model (the loop itself is engine/trainer.py)."""

from engine.stages import STAGES


@STAGES.register("train")
def train(ctx) -> dict:
    """Fine-tune with the configured adapter, loss and schedule; save the adapter."""
    from engine.trainer import train as run

    if ctx.data is None:
        from engine.stages.prepare_data import prepare_data

        ctx.record("prepare_data", prepare_data(ctx))
    return run(ctx)
