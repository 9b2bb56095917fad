"""What the model will be trained on, as text: trained-on tokens wrapped in [[ ]].

Most fine-tuning failures are data failures (wrong template, loss on the prompt, a cut
answer), and they are visible at a glance in the rendered text. Everything outside
[[ ]] is context only (label -100).
"""

from __future__ import annotations

OPEN, CLOSE = "[[", "]]"


def preview_text(examples: list, tokenizer) -> str:
    """One block per example: a header with its token counts, then the marked text."""
    blocks = []
    for i, ex in enumerate(examples):
        n_label = sum(label != -100 for label in ex.labels)
        head = f"--- example {i + 1}/{len(examples)}: {len(ex.input_ids)} tokens, {n_label} trained on [[ ]] ---"
        blocks.append(f"{head}\n{marked(ex, tokenizer)}")
    return "\n\n".join(blocks) + "\n"


def marked(example, tokenizer) -> str:
    """The example's text with each run of labelled tokens wrapped in [[ ]]."""
    out, run, trained = [], [], None
    for tid, label in zip(example.input_ids, example.labels, strict=True):
        on = label != -100
        if on != trained and run:
            out.append(_piece(run, trained, tokenizer))
            run = []
        run.append(tid)
        trained = on
    if run:
        out.append(_piece(run, trained, tokenizer))
    return "".join(out)


def _piece(ids, trained, tokenizer) -> str:
    text = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    return f"{OPEN}{text}{CLOSE}" if trained else text
