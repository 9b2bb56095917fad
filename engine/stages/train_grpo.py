"""train_grpo: reinforcement learning from the configured reward (GRPO; the loop is engine/rl/grpo.py).

The reward group says what an answer is worth (``reward=format_numeric`` ...), the ``grpo``
group how completions are sampled and the policy updated; optimizer, schedule, length,
checkpoints and loggers are the ``train`` group's, so a GRPO run resumes like ``train``.
"""

from engine.context import RunContext
from engine.reward import REWARDS
from engine.rl import train_grpo as run
from engine.rl.job import GrpoJob
from engine.stages.registry import STAGES

# What the run summary and the report's Training line read under ``train``; GRPO's own numbers
# stay under ``train_grpo``.
SUMMARY = ("steps", "first_loss", "final_loss", "train_seconds", "tokens_per_s", "precision", "device", "adapter_dir")


@STAGES.register("train_grpo", traits=("trains", "needs:data"))
def train_grpo(ctx: RunContext) -> dict:
    """Sample groups of answers to the split's prompts, score them, train the adapter towards the better ones."""
    cfg = ctx.cfg
    job = GrpoJob(
        **ctx.training_inputs(),
        grpo=cfg.grpo,
        reward=REWARDS.build(cfg.reward),
    )
    metrics = run(job)
    ctx.record("train", {k: metrics.get(k) for k in SUMMARY})
    return metrics
