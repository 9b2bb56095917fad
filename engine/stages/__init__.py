"""The stage registry: a recipe lists ``stages: [...]`` and the pipeline runs them in order.

A stage is a function ``(ctx: RunContext) -> dict | None``; what it returns is recorded
under its name in metrics.json. Plugins register more with ``@STAGES.register("name")``.
"""

from engine.registry import Registry

STAGES = Registry("stage")

# Importing the modules registers the built-in stages.
from engine.stages import (  # noqa: E402,F401
    archive_documents,
    evaluate,
    layered,  # registers train_layered
    prepare_data,
    preview_data,
    report,
    train,
)
