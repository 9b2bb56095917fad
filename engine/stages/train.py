"""train: fine-tune the model (the loop itself is engine/train/loop.py)."""

from engine.context import RunContext
from engine.stages.registry import STAGES
from engine.train import train as run
from engine.train.job import TrainJob


@STAGES.register("train", traits=("trains", "needs:data"))
def train(ctx: RunContext) -> dict:
    """Fine-tune with the configured adapter, loss and schedule; save the adapter."""
    cfg = ctx.cfg
    return run(
        TrainJob(
            run_dir=ctx.run_dir,
            accelerator=ctx.accelerator,
            model=ctx.model(),
            tokenizer=ctx.tokenizer(),
            data=ctx.data,
            train=cfg.train,
            loss=cfg.loss,
            seed=cfg.seed,
            model_spec=cfg.model,
            config=cfg.raw,
        )
    )
