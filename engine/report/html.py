"""report.html: one self-contained file (inline CSS, plots as base64 PNG, no scripts).

Every piece of text from a model or a data file is escaped: generations are untrusted.
"""

from __future__ import annotations

import base64
import html
import re

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


def _inline(text: str) -> str:
    """Escape, then render `code` spans (the only Markdown the report's paragraphs use)."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))


def _cell(text: str) -> str:
    cls = []
    if re.fullmatch(r"[-+]?\d[\d.]*(?: better| worse)?|n/a", text):
        cls.append("num")
    if text.endswith(" better"):
        cls.append("better")
    elif text.endswith(" worse"):
        cls.append("worse")
    elif text in ("pass", "FAIL"):  # the export table's result column
        cls.append(text.lower())
    attr = f' class="{" ".join(cls)}"' if cls else ""
    return f"<td{attr}>{_inline(text)}</td>"


def to_html(title: str, blocks) -> str:
    parts = [
        f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{html.escape(title)}</title>",
        f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>",
    ]
    for b in blocks:
        if b.kind == "h2":
            parts.append(f"<h2>{html.escape(b.text)}</h2>")
        elif b.kind == "p":
            parts.append(f"<p>{_inline(b.text)}</p>")
        elif b.kind == "table":
            head = "".join(f"<th>{html.escape(h)}</th>" for h in b.header)
            body = "".join("<tr>" + "".join(_cell(c) for c in row) + "</tr>" for row in b.rows)
            parts.append(f'<table class="metrics"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>')
        elif b.kind == "img":
            data = base64.b64encode(b.png).decode()
            parts.append(
                f'<figure><img alt="{html.escape(b.text)}" src="data:image/png;base64,{data}">'
                f"<figcaption>{html.escape(b.text)}</figcaption></figure>"
            )
        elif b.kind == "sample":
            s = b.sample
            cols = [("reference", s["reference"])]
            if "base" in s:
                cols.append((f"base (ROUGE-L {s.get('base_rougeL', 0):.2f})", s["base"]))
            cols.append((f"fine-tuned (ROUGE-L {s.get('finetuned_rougeL', 0):.2f})", s["finetuned"]))
            inner = "".join(f"<div><b>{html.escape(h)}</b>{html.escape(t)}</div>" for h, t in cols)
            parts.append(
                f'<div class="sample"><div class="q">{html.escape(s["question"])}</div><div class="cols">{inner}</div></div>'
            )
    parts.append("</body></html>")
    return "\n".join(parts)
