"""train_layered: train adapter levels in sequence, each on top of the frozen levels below.

Each level is an ordinary run of the training loop in ``levels/level_K``; ``adapter/`` then
holds every level (``adapter/level_1`` ...). The work is engine/train/layered.py.
"""

from engine.context import RunContext
from engine.stages.registry import STAGES
from engine.train import train_layered as run
from engine.train.job import TrainJob


@STAGES.register("train_layered", traits=("trains", "needs:data"))
def train_layered(ctx: RunContext) -> dict:
    """Train adapter.levels LoRA levels one after another; save each as adapter/level_K."""
    cfg = ctx.cfg
    job = TrainJob(
        **ctx.training_inputs(),
        loss=cfg.loss,
    )
    layered = run(job, cfg.adapter)
    # The run summary and report read ``train``: the whole sequence; per-level details stay under ``train_layered``.
    ctx.record("train", layered.summary)
    return {"levels": layered.levels, "eval_scales": layered.scales}
