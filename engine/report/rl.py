"""The report's GRPO section: what the run sampled and scored, the reward per step, and the
reward on held-out prompts before (base) and after (tuned).

Reads plain values only: ``train_grpo`` and ``evaluate.reward`` as metrics.json nests them,
and train_log.jsonl for the per-step curve.
"""

from __future__ import annotations

from pathlib import Path

from engine.render.page import Block
from engine.report.style import change, number
from engine.runs import TRAIN_LOG, read_log


def rl_blocks(run_dir: Path, metrics: dict, reward_kind: str | None = None) -> list[Block]:
    """Blocks of the GRPO section; none when neither train_grpo ran nor evaluate scored a reward."""
    g = metrics.get("train_grpo")
    held_out = metrics.get("evaluate", {}).get("reward")
    if not g and not held_out:
        return []
    out = [Block("h2", "GRPO: reward" if g else "Reward")]
    if g:
        per_step = (g.get("prompts") or 0) // max(1, g.get("steps") or 1)
        out.append(
            Block(
                "p",
                f"{g.get('steps')} steps of {per_step} prompt{'' if per_step == 1 else 's'} x {g.get('group_size')} sampled "
                f"answers ({g.get('completions')} answers scored"
                + (f" by a reward of kind {reward_kind}" if reward_kind else "")
                + f"); mean reward of the first {g.get('reward_window')} steps {number(g.get('reward_first'))}, "
                f"of the last {g.get('reward_window')} {number(g.get('reward_last'))}; final KL to the base "
                f"{number(g.get('final_kl'))}; {g.get('train_seconds')} s. Every scored answer is in samples.jsonl.",
            )
        )
        curve = _reward_curve(run_dir)
        if curve:
            out.append(curve)
    if held_out:
        rows = [
            [
                "reward (total)",
                number(held_out.get("base")),
                number(held_out.get("finetuned")),
                change(held_out.get("base"), held_out.get("finetuned")),
            ]
        ]
        for name, v in (held_out.get("parts") or {}).items():
            rows.append([name, number(v.get("base")), number(v.get("finetuned")), change(v.get("base"), v.get("finetuned"))])
        out += [
            Block(
                "p", f"Reward on held-out prompts ({held_out.get('examples')} answers per model, greedy, the evaluate stage's):"
            ),
            Block("table", header=["reward", "base", "tuned", "change"], rows=rows),
        ]
    return out


def _reward_curve(run_dir: Path) -> Block | None:
    recs = read_log(run_dir / TRAIN_LOG)
    points = [(r["step"], r["reward_mean"]) for r in recs if "reward_mean" in r]
    if not points:
        return None
    from engine.report.plots import series_curve

    png = series_curve(*zip(*points, strict=True), ylabel="mean reward of the sampled answers", title="GRPO reward")
    return Block("img", "Mean reward of the sampled answers per step", png=png, path="plots/reward.png")
