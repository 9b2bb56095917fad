"""A model's name wherever a run shows it: the report, /v1/models, a retrieval index's meta.json.

Why one function: a run dir and a server's answers are shared, so the name must never be a
local path, and the same model must carry the same name in the report, behind the API and in
an index built from its vectors.
"""

from __future__ import annotations

from pathlib import Path

from engine.model import GgufSpec, HfSpec, ModelSpec


def display_name(spec: ModelSpec) -> str:
    """The hub id as typed; a local model dir by its folder name; a packaged GGUF by its file
    name without ``.gguf`` (as the llama.cpp server names the file it serves); else the kind (``tiny``)."""
    if isinstance(spec, GgufSpec):
        return Path(spec.file).stem
    if isinstance(spec, HfSpec):
        local = Path(spec.name_or_path).expanduser()
        return local.name if local.is_absolute() or local.is_dir() else spec.name_or_path
    return spec.kind
