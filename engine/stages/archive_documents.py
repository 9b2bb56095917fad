"""archive_documents: move the documents a run trained on out of the inbox folder.

A separate stage, listed after train (``stages=[prepare_data,train,archive_documents]``),
so files move only once training on them has finished: a crashed run leaves the folder
as it was and can simply be run again.
"""

from engine.context import RunContext
from engine.data.documents import archive
from engine.files import shown_path
from engine.stages.registry import STAGES


@STAGES.register("archive_documents", traits=("needs:data",))
def archive_documents(ctx: RunContext) -> dict:
    """Move the used documents (documents.json: usable) from data.path to data.archive_dir."""
    spec = ctx.cfg.data  # validation (engine/checks.py) made sure: documents, archive_dir set, after training
    used = [d.file for d in ctx.data.documents if d.usable]
    moved = archive(spec, used) if ctx.is_main else []
    ctx.accelerator.wait_for_everyone()
    return {"archived": len(moved), "archive_dir": shown_path(spec.archive_dir, ctx.run_dir)}
