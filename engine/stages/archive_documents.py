"""archive_documents: move the documents a run trained on out of the inbox folder.

A separate stage, listed after train (``stages=[prepare_data,train,archive_documents]``),
so files move only once training on them has finished: a crashed run leaves the folder
as it was and can simply be run again.
"""

from engine.errors import ConfigError
from engine.stages import STAGES


@STAGES.register("archive_documents")
def archive_documents(ctx) -> dict:
    """Move the used documents (documents.json: usable) from data.path to data.archive_dir."""
    from engine.data.documents import archive
    from engine.data.spec import DocumentsSpec

    spec = ctx.cfg.data
    if not isinstance(spec, DocumentsSpec) or not spec.archive_dir:
        raise ConfigError("stages: archive_documents needs data=documents and data.archive_dir=<folder>")
    if ctx.data is None:
        raise ConfigError("stages: archive_documents must come after prepare_data (and train)")
    used = [d.file for d in ctx.data.documents if d.usable]
    moved = archive(spec, used) if ctx.is_main else []
    ctx.accelerator.wait_for_everyone()
    return {"archived": len(moved), "archive_dir": spec.archive_dir}
