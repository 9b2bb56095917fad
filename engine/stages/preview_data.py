"""preview_data: show what the model will be trained on, before training on it (engine/report/preview.py)."""

from engine.context import RunContext
from engine.report.preview import preview_text
from engine.stages.registry import STAGES


@STAGES.register("preview_data", traits=("needs:data",))
def preview_data(ctx: RunContext) -> dict:
    """Print data.preview rendered training examples (trained-on tokens in [[ ]]); preview.txt."""
    examples = ctx.data.splits["train"][: ctx.cfg.data.preview]
    text = preview_text(examples, ctx.tokenizer())
    if ctx.is_main:
        print(text, flush=True)
        (ctx.run_dir / "preview.txt").write_text(text)
    return {"examples": len(examples), "file": "preview.txt"}
