"""The run's reward on the answers the evaluate stage generated, base and fine-tuned.

Why: the reward is the number a GRPO run trained on; scoring the base's and the tuned model's
held-out answers with it (the same texts the other metrics saw) says whether training raised it.
Read from generations.jsonl, the record of those answers (row i answers examples[i]).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from engine.reward.base import items_from_examples
from engine.reward.spec import REWARDS


def reward_scores(spec, examples: list, generations: Path) -> dict:
    """Mean total and mean parts per model variant; empty when there is no generations file."""
    if not generations.is_file():
        return {}
    rows = [json.loads(line) for line in generations.read_text().splitlines() if line.strip()]
    items = items_from_examples(examples)
    reward = REWARDS.build(spec)
    out: dict = {"kind": spec.kind, "examples": len(rows)}
    parts: dict[str, dict[str, float]] = {}
    for variant in ("base", "finetuned"):
        if not rows or variant not in rows[0]:
            continue
        scored = reward.score([r[variant] for r in rows], items[: len(rows)])
        out[variant] = round(statistics.fmean(s.value for s in scored), 6)
        for name in sorted({k for s in scored for k in s.parts}):
            values = [s.parts[name] for s in scored if name in s.parts]
            parts.setdefault(name, {})[variant] = round(statistics.fmean(values), 6)
    out["parts"] = parts
    return out


def with_reward(metrics: dict, spec, examples: list, generations: Path, split: str) -> dict:
    """Evaluate's ``metrics`` with the reward added (in place): ``reward`` holds totals and parts.

    The total also sits beside the split's metrics (``<split>.reward``, ``base.<split>.reward``):
    the summary and the report's base vs fine-tuned table show it with its change.
    """
    scores = reward_scores(spec, examples, generations)
    if "finetuned" in scores:
        metrics.setdefault(split, {})["reward"] = scores["finetuned"]
        if "base" in scores:
            metrics.setdefault("base", {}).setdefault(split, {})["reward"] = scores["base"]
        metrics["reward"] = scores
    return metrics
