"""A page as blocks (heading, paragraph, list, table, image, sample), written twice from the same list.

Markdown links an image by its path next to the page; HTML inlines it as a base64 PNG, so the
one file can be mailed or attached to a ticket. Every piece of text is escaped in HTML:
generations and error messages are untrusted. Text may use two bits of Markdown, `code` and
**bold**; nothing else is interpreted.
"""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass, field


@dataclass
class Block:
    kind: str
    """h2 | p | list | table | img | sample"""
    text: str = ""
    """h2 and p: the text; img: its caption (and alt text)."""
    items: list[str] = field(default_factory=list)
    """list: one line per item."""
    header: list[str] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)
    classes: list[list[str]] = field(default_factory=list)
    """table: each cell's HTML class ("" for none), row by row; empty for none at all."""
    row_classes: list[str] = field(default_factory=list)
    """table: each row's HTML class ("" for none); empty for none at all."""
    png: bytes = b""
    path: str = ""
    """img: where the PNG lies, relative to the page (``plots/loss.png``): the Markdown link."""
    sample: dict = field(default_factory=dict)
    """A side-by-side generation: question, reference, base, finetuned (and their ROUGE-L)."""


# ---------------------------------------------------------------- Markdown


def to_markdown(title: str, blocks: list[Block]) -> str:
    lines = [f"# {title}", ""]
    for b in blocks:
        if b.kind == "h2":
            lines += [f"## {b.text}", ""]
        elif b.kind == "p":
            lines += [b.text, ""]
        elif b.kind == "list":
            lines += [*(f"- {item}" for item in b.items), ""]
        elif b.kind == "table":
            lines += [_md_row(b.header), "|" + "---|" * len(b.header)]
            lines += [_md_row(row) for row in b.rows] + [""]
        elif b.kind == "img":
            lines += [f"![{b.text}]({b.path})", ""]
        elif b.kind == "sample":
            lines += _md_sample(b.sample)
    return "\n".join(lines) + "\n"


def _md_row(cells: list[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |"


def _md_sample(s: dict) -> list[str]:
    lines = [f"**{_one_line(s['question'], 300)}**", "", f"- reference: {_one_line(s['reference'])}"]
    if "base" in s:
        lines.append(f"- base (ROUGE-L {s.get('base_rougeL', 0):.2f}): {_one_line(s['base'])}")
    return [*lines, f"- fine-tuned (ROUGE-L {s.get('finetuned_rougeL', 0):.2f}): {_one_line(s['finetuned'])}", ""]


def _one_line(text: str, limit: int = 600) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


# ---------------------------------------------------------------- HTML


def to_html(title: str, blocks: list[Block], css: str) -> str:
    """One self-contained file: ``css`` inline, images as data URIs, no scripts."""
    e = html.escape
    parts = [
        f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{e(title)}</title>",
        f"<style>{css}</style></head><body><h1>{e(title)}</h1>",
    ]
    for b in blocks:
        if b.kind == "h2":
            parts.append(f"<h2>{e(b.text)}</h2>")
        elif b.kind == "p":
            parts.append(f"<p>{inline(b.text)}</p>")
        elif b.kind == "list":
            parts.append("<ul>" + "".join(f"<li>{inline(item)}</li>" for item in b.items) + "</ul>")
        elif b.kind == "table":
            parts.append(_html_table(b))
        elif b.kind == "img":
            data = base64.b64encode(b.png).decode()
            parts.append(
                f'<figure><img alt="{e(b.text)}" src="data:image/png;base64,{data}"><figcaption>{e(b.text)}</figcaption></figure>'
            )
        elif b.kind == "sample":
            parts.append(_html_sample(b.sample))
    parts.append("</body></html>")
    return "\n".join(parts)


def inline(text: str) -> str:
    """Escape, then render `code` spans and **bold** (the only Markdown the pages' text uses)."""
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))
    return re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)


def _html_table(b: Block) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in b.header)
    body = []
    for i, row in enumerate(b.rows):
        classes = b.classes[i] if i < len(b.classes) else []
        cells = "".join(_td(text, classes[j] if j < len(classes) else "") for j, text in enumerate(row))
        body.append(f"<tr{_class(b.row_classes[i] if i < len(b.row_classes) else '')}>{cells}</tr>")
    return f'<table class="metrics"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def _td(text: str, cls: str) -> str:
    return f"<td{_class(cls)}>{inline(text)}</td>"


def _class(cls: str) -> str:
    return f' class="{cls}"' if cls else ""


def _html_sample(s: dict) -> str:
    e = html.escape
    cols = [("reference", s["reference"])]
    if "base" in s:
        cols.append((f"base (ROUGE-L {s.get('base_rougeL', 0):.2f})", s["base"]))
    cols.append((f"fine-tuned (ROUGE-L {s.get('finetuned_rougeL', 0):.2f})", s["finetuned"]))
    inner = "".join(f"<div><b>{e(h)}</b>{e(t)}</div>" for h, t in cols)
    return f'<div class="sample"><div class="q">{e(s["question"])}</div><div class="cols">{inner}</div></div>'
