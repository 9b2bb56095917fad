"""How the report writes values and how report.html looks: numbers, changes, the style sheet, cell classes.

The page itself is written by engine.render.page (shared with the sweep summary); this is the
report's part of it, used by every section (content, retrieval, rl). A cell's class comes from
its text, so every table (metrics, retrieval, GRPO, export, adapter matrix) is marked the same
way without each building classes.
"""

from __future__ import annotations

import re

from engine.render.page import Block

CSS = """
body{font:15px/1.5 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;color:#1a202c;
     max-width:1100px;margin:2rem auto;padding:0 1rem}
h1{font-size:1.6rem;margin-bottom:.3rem}h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #e2e8f0;padding-bottom:.2rem}
table{border-collapse:collapse;margin:.6rem 0}th,td{border:1px solid #e2e8f0;padding:.3rem .7rem;text-align:left}
th{background:#f7fafc}td.num{text-align:right;font-variant-numeric:tabular-nums}
.better,.pass{color:#276749}.worse,.fail{color:#c53030}code{background:#f7fafc;padding:0 .2rem;border-radius:3px}
img{max-width:100%;border:1px solid #e2e8f0;margin:.5rem 0}
.sample{border:1px solid #e2e8f0;border-radius:6px;margin:1rem 0;padding:.6rem .9rem}
.sample .q{font-weight:600;margin-bottom:.4rem}.cols{display:grid;grid-template-columns:repeat(3,1fr);gap:.8rem}
.cols div{background:#f7fafc;padding:.5rem;border-radius:4px;white-space:pre-wrap;font-size:.9rem}
.cols b{display:block;font-size:.8rem;color:#4a5568;margin-bottom:.2rem}
"""


def number(v) -> str:
    """A metric as the report's tables show it: floats to 4 decimals, a missing one as n/a."""
    if v is None:
        return "n/a"
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def change(base, tuned, lower_is_better: bool = False) -> str:
    """``tuned - base`` signed, with ``better``/``worse`` (a decrease is better for perplexity, mae ...)."""
    if not isinstance(base, int | float) or not isinstance(tuned, int | float):
        return ""
    delta = tuned - base
    better = delta < 0 if lower_is_better else delta > 0
    mark = "" if abs(delta) < 1e-9 else (" better" if better else " worse")
    return f"{delta:+.4f}{mark}"


def cell_class(text: str) -> str:
    """``num`` for a number (and a change: ``+0.19 better``), ``better``/``worse``, ``pass``/``fail``."""
    cls = []
    if re.fullmatch(r"[-+]?\d[\d.]*(?: better| worse)?|n/a", text):
        cls.append("num")
    if text.endswith(" better"):
        cls.append("better")
    elif text.endswith(" worse"):
        cls.append("worse")
    elif text in ("pass", "FAIL"):  # the export table's result column
        cls.append(text.lower())
    return " ".join(cls)


def classed(blocks: list[Block]) -> list[Block]:
    """The blocks with every table cell's class set from its text."""
    for b in blocks:
        if b.kind == "table":
            b.classes = [[cell_class(c) for c in row] for row in b.rows]
    return blocks
