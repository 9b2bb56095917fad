"""train_grpo: reinforcement learning from the configured reward (GRPO; the loop is engine/rl/grpo.py).

The reward group says what an answer is worth (``reward=format_numeric`` ...), the ``grpo``
group how completions are sampled and the policy updated; optimizer, schedule, length,
checkpoints and loggers are the ``train`` group's, so a GRPO run resumes like ``train``.
"""

from engine.stages.prepare_data import ensure_data
from engine.stages.registry import STAGES


@STAGES.register("train_grpo", traits=("trains",))
def train_grpo(ctx) -> dict:
    """Sample groups of answers to the split's prompts, score them, train the adapter towards the better ones."""
    from engine.reward import REWARDS
    from engine.rl.grpo import GrpoJob
    from engine.rl.grpo import train_grpo as run

    ensure_data(ctx)
    cfg = ctx.cfg
    job = GrpoJob(cfg, ctx.run_dir, ctx.accelerator, ctx.model(), ctx.tokenizer(), ctx.data, REWARDS.build(cfg.reward))
    metrics = run(job)
    # The run summary and the report's Training line read ``train``; GRPO's own numbers stay
    # under ``train_grpo``.
    keys = ("steps", "first_loss", "final_loss", "train_seconds", "tokens_per_s", "precision", "device", "adapter_dir")
    ctx.record("train", {k: metrics.get(k) for k in keys})
    return metrics
