"""preview_data: show what the model will be trained on, before training on it (engine/report/preview.py)."""

from engine.stages.prepare_data import ensure_data
from engine.stages.registry import STAGES


@STAGES.register("preview_data")
def preview_data(ctx) -> dict:
    """Print data.preview rendered training examples (trained-on tokens in [[ ]]); preview.txt."""
    from engine.report.preview import preview_text

    ensure_data(ctx)
    examples = ctx.data.splits["train"][: ctx.cfg.data.preview]
    text = preview_text(examples, ctx.tokenizer())
    if ctx.is_main:
        print(text, flush=True)
        (ctx.run_dir / "preview.txt").write_text(text)
    return {"examples": len(examples), "file": "preview.txt"}
