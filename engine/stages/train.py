"""train: fine-tune the model (the loop itself is engine/train/loop.py)."""

from engine.stages.prepare_data import ensure_data
from engine.stages.registry import STAGES


@STAGES.register("train", traits=("trains",))
def train(ctx) -> dict:
    """Fine-tune with the configured adapter, loss and schedule; save the adapter."""
    from engine.train.loop import TrainJob
    from engine.train.loop import train as run

    ensure_data(ctx)
    return run(TrainJob(ctx.cfg, ctx.run_dir, ctx.accelerator, ctx.model(), ctx.tokenizer(), ctx.data))
