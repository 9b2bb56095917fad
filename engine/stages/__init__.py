"""The stage registry: a recipe lists ``stages: [...]`` and the pipeline runs them in order.

A stage is a function ``(ctx: RunContext) -> dict | None``; what it returns is recorded
under its name in metrics.json. A stage is the only code that reads the run context; it
calls into the packages below (train, evaluate, report, data ...) with plain arguments.
One file per stage key. Plugins register more with ``@STAGES.register("name")``.

No stage runs another, so the stage list is all that runs. What a stage needs from an earlier
one is declared as traits, and validation (engine/checks.py) checks the order before anything
loads: ``needs:data`` (reads ``ctx.data``) after a ``gives:data`` stage (prepare_data),
``needs:merged`` (run_dir/merged) after ``gives:merged`` (merge); ``trains`` marks a stage that
produces trained weights. A stage module imports its packages at the top (they import torch only
inside the functions that use it, so importing this package stays fast) and no other stage module.
"""

# Importing the modules registers the built-in stages.
from engine.stages import (  # noqa: F401
    adapter_matrix,
    archive_documents,
    build_index,
    chat,
    check_export,
    evaluate,
    export_gguf,
    export_onnx,
    merge,
    prepare_data,
    preview_data,
    report,
    serve,
    train,
    train_grpo,
    train_layered,
)
from engine.stages.registry import STAGES

__all__ = ["STAGES"]
