"""Reports of a run: report.md and a self-contained report.html, from the same blocks.

The report is built once as a list of blocks (content.py: heading, paragraph, table, image,
sample) and written twice by engine.render.page (the page writer the sweep summary uses too):
Markdown (plots as PNG files under plots/) and HTML (the same PNGs inlined as base64, so the
one file can be mailed or attached to a ticket).

  content.py   what the report says, from ``WhatRan`` (the specs it names), metrics.json and the run dir's files
  retrieval.py the Retrieval section;  rl.py  the GRPO / reward section
  style.py     report.html's style sheet and table-cell classes
  plots.py     the loss curve and the base vs fine-tuned bars (drawn with engine.render.plot)
  preview.py   the preview_data stage's text: training examples with trained-on tokens in [[ ]]
"""

from __future__ import annotations

from pathlib import Path

from engine.render.page import to_html, to_markdown
from engine.report.content import Scales, WhatRan, build
from engine.report.style import CSS, classed

__all__ = ["Scales", "WhatRan", "write_report"]


def write_report(run_dir: Path, about: WhatRan, metrics: dict, scales: Scales) -> dict:
    """Write report.md, report.html and plots/*.png into ``run_dir``; returns their names in it.

    Args:
        run_dir: the run's directory (generations.jsonl and train_log.jsonl are read from it).
        about: what ran: the recipe, stages, the specs the report names and the evaluation settings.
        metrics: every stage's metrics so far, nested by stage name (as in metrics.json).
        scales: which metric names are better lower and which are 0-1 scores.
    """
    title = f"Run report: {about.recipe}"
    blocks = classed(build(run_dir, about, metrics, scales))
    for b in blocks:
        if b.kind == "img":
            (run_dir / b.path).parent.mkdir(exist_ok=True)
            (run_dir / b.path).write_bytes(b.png)
    (run_dir / "report.md").write_text(to_markdown(title, blocks))
    (run_dir / "report.html").write_text(to_html(title, blocks, CSS))
    return {"path": "report.md", "html": "report.html"}
