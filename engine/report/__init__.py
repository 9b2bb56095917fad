"""Reports of a run: report.md and a self-contained report.html, from the same blocks.

The report is built once as a list of blocks (content.py: heading, paragraph, table, image,
sample) and written twice: Markdown (plots as PNG files under plots/) and HTML (the same
PNGs inlined as base64, so the one file can be mailed or attached to a ticket).

  content.py   what the report says, from the config, metrics.json and the run dir's files
  blocks.py    the Block the two writers share
  markdown.py  report.md
  html.py      report.html (inline CSS, escaped, no scripts)
  plots.py     the loss curve and the base vs fine-tuned bars (matplotlib, headless)
  preview.py   the preview_data stage's text: training examples with trained-on tokens in [[ ]]
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engine.report.content import Scales, build
from engine.report.html import to_html
from engine.report.markdown import to_markdown

__all__ = ["Scales", "write_report"]


def write_report(run_dir: Path, cfg: Any, metrics: dict, scales: Scales) -> dict:
    """Write report.md, report.html and plots/*.png into ``run_dir``; returns their names in it.

    Args:
        run_dir: the run's directory (generations.jsonl and train_log.jsonl are read from it).
        cfg: the validated run config (recipe, stages, each group's spec, eval settings).
        metrics: every stage's metrics so far, nested by stage name (as in metrics.json).
        scales: which metric names are better lower and which are 0-1 scores.
    """
    title = f"Run report: {cfg.recipe}"
    blocks = build(run_dir, cfg, metrics, scales)
    for b in blocks:
        if b.kind == "img":
            (run_dir / "plots").mkdir(exist_ok=True)
            (run_dir / "plots" / b.name).write_bytes(b.png)
    (run_dir / "report.md").write_text(to_markdown(title, blocks))
    (run_dir / "report.html").write_text(to_html(title, blocks))
    return {"path": "report.md", "html": "report.html"}
