"""preview_data: show what the model will be trained on, before training on it.

Most fine-tuning failures are data failures (wrong template, loss on the prompt, a cut
answer), and they are visible at a glance in the rendered text. Trained-on tokens are
wrapped in [[ ]]; everything outside is context only (label -100).
"""

from engine.stages.prepare_data import ensure_data
from engine.stages.registry import STAGES

OPEN, CLOSE = "[[", "]]"


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


@STAGES.register("preview_data")
def preview_data(ctx) -> dict:
    """Print data.preview rendered training examples (trained-on tokens in [[ ]]); preview.txt."""
    ensure_data(ctx)
    tokenizer = ctx.tokenizer()
    examples = ctx.data.splits["train"][: ctx.cfg.data.preview]
    blocks = []
    for i, ex in enumerate(examples):
        n_label = sum(label != -100 for label in ex.labels)
        head = f"--- example {i + 1}/{len(examples)}: {len(ex.input_ids)} tokens, {n_label} trained on [[ ]] ---"
        blocks.append(f"{head}\n{marked(ex, tokenizer)}")
    text = "\n\n".join(blocks) + "\n"
    if ctx.is_main:
        print(text, flush=True)
        (ctx.run_dir / "preview.txt").write_text(text)
    return {"examples": len(examples), "file": str(ctx.run_dir / "preview.txt")}
