"""train: fine-tune the model (the loop itself is engine/train/loop.py)."""

from engine.context import RunContext
from engine.stages.registry import STAGES
from engine.train import train as run
from engine.train.job import TrainJob


@STAGES.register("train", traits=("trains", "needs:data"))
def train(ctx: RunContext) -> dict:
    """Fine-tune with the configured adapter, loss and schedule; save the adapter."""
    return run(TrainJob(**ctx.training_inputs(), loss=ctx.cfg.loss))
