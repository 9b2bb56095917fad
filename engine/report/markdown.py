"""report.md: the report's blocks as Markdown (plots are PNG files under plots/, linked)."""

from __future__ import annotations

from engine.report.blocks import Block


def to_markdown(title: str, blocks: list[Block]) -> str:
    lines = [f"# {title}", ""]
    for b in blocks:
        if b.kind == "h2":
            lines += [f"## {b.text}", ""]
        elif b.kind == "p":
            lines += [b.text, ""]
        elif b.kind == "table":
            lines += ["| " + " | ".join(h.replace("|", "\\|") for h in b.header) + " |", "|" + "---|" * len(b.header)]
            lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in b.rows] + [""]
        elif b.kind == "img":
            lines += [f"![{b.text}](plots/{b.name})", ""]
        elif b.kind == "sample":
            s = b.sample
            lines += [f"**{_one_line(s['question'], 300)}**", "", f"- reference: {_one_line(s['reference'])}"]
            if "base" in s:
                lines.append(f"- base (ROUGE-L {s.get('base_rougeL', 0):.2f}): {_one_line(s['base'])}")
            lines += [f"- fine-tuned (ROUGE-L {s.get('finetuned_rougeL', 0):.2f}): {_one_line(s['finetuned'])}", ""]
    return "\n".join(lines) + "\n"


def _one_line(text: str, limit: int = 600) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
