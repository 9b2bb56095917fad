"""What the export stages leave in run_dir/export, and the manifest that lists it.

``write_gguf_files``: the merged model as ``model-<format>.gguf`` per ``export.formats``; with
``export.lora`` and a trained LoRA, ``adapter-lora.gguf`` plus the base it applies to (the
packaged GGUF the run started from, or ``base-<f32|f16>.gguf`` written here). ``write_onnx_files``:
``model.onnx`` (+ ``model.onnx.data``). Each adds its files to ``manifest.json`` next to what the
other listed, with sizes and, for a LoRA, its base by package + file or by its name in export/
(no local path: ``engine.export.manifest.base_gguf_of`` resolves it).

Layered adapters: one ``adapter-lora.gguf`` holds every level, stacked along the rank with each
level's scale folded into its B, i.e. exactly the update merge folds into model-*.gguf and the
model check_export compares with. Why not one file per level: llama.cpp would apply them at
whatever scales a user passes, and only the stack as trained is checked.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from engine.export import gguf_header_string
from engine.export.gguf import export_formats, write_lora_gguf
from engine.export.manifest import base_entry, read_manifest, write_manifest
from engine.export.merge import Trained, load_base
from engine.export.onnx import write_onnx
from engine.files import gguf_path


def write_gguf_files(
    merged: Path, out: Path, spec: Any, *, model_spec: Any, quant_spec: Any, trained: Trained
) -> dict[str, dict]:
    """Merged model -> GGUF in each ``spec.formats``; the LoRA alone -> a GGUF adapter; the manifest updated.

    Args:
        merged: the merged HF dir (its tokenizer holds the training template).
        out: the export dir (run_dir/export).
        spec: the ``export`` group's spec (formats, lora).
        model_spec, quant_spec: the run's base, for the LoRA's base GGUF (the packaged file, or written here).
        trained: the run's trained weights (a LoRA is written only for an adapter).
    Returns: the manifest entries written (file name -> kind, format, bytes ...).
    """
    template, pre = _template(merged), source_pre(model_spec)
    files: dict[str, dict] = {}
    for fmt, path in export_formats(merged, out, spec.formats, stem="model", chat_template=template, pre=pre).items():
        files[path.name] = {"kind": "model", "format": fmt}
    if spec.lora and trained.is_lora:
        base, base_format = _base_gguf(model_spec, quant_spec, spec.formats, out, template, pre)
        config = json.loads((merged / "config.json").read_text())
        lora = write_lora_gguf(trained, config, out / "adapter-lora.gguf")
        files[lora.name] = {"kind": "lora", "base": base, "base_format": base_format}
        if trained.levels:
            files[lora.name] |= {"levels": trained.levels, "scales": trained.scales}
    for name, entry in files.items():
        entry["bytes"] = (out / name).stat().st_size
    onnx = {n: e for n, e in read_manifest(out).items() if e["kind"] == "onnx"}  # export_onnx may have run first
    write_manifest(out, onnx | files)
    return files


def write_onnx_files(merged: Path, out: Path) -> dict[str, dict]:
    """Merged model -> export/model.onnx, added to the manifest next to whatever export_gguf listed."""
    written = write_onnx(merged, out / "model.onnx")
    entry = {"kind": "onnx", "format": "onnx", "bytes": sum(p.stat().st_size for p in written)}
    if len(written) > 1:
        entry["data"] = written[1].name
    files = {written[0].name: entry}
    write_manifest(out, read_manifest(out) | files)
    return files


def _template(merged: Path) -> str:
    """The training template merge saved with the tokenizer."""
    jinja = merged / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    return json.loads((merged / "tokenizer_config.json").read_text()).get("chat_template") or ""


def source_pre(model_spec: Any) -> str | None:
    """The pre-tokenizer name of the packaged GGUF the run started from (exact, not re-derived)."""
    if model_spec.kind != "gguf":
        return None
    return gguf_header_string(gguf_path(model_spec.package, model_spec.file), "tokenizer.ggml.pre")


def _base_gguf(
    model_spec: Any, quant_spec: Any, formats: list[str], out: Path, template: str, pre: str | None
) -> tuple[dict, str]:
    """The base GGUF a LoRA adapter applies to, as the manifest records it (``base_entry``), and its format:
    the packaged file itself, else the base written here."""
    if model_spec.kind == "gguf":
        path = gguf_path(model_spec.package, model_spec.file)
        return base_entry(path, out, package=model_spec.package, file=model_spec.file), path.stem.rsplit(".", 1)[-1]
    fmt = "f32" if "f32" in formats else "f16"
    path = base_gguf_files(model_spec, quant_spec, out, [fmt], stem="base", chat_template=template, pre=pre)[fmt]
    return base_entry(path, out), fmt


def base_gguf_files(
    model_spec: Any,
    quant_spec: Any,
    out_dir: Path,
    formats: list[str],
    *,
    stem: str,
    chat_template: str,
    pre: str | None,
    loaded: tuple[Any, Any] | None = None,
) -> dict[str, Path]:
    """The untrained base (as the adapter was trained on it, de-quantized), written by our writer as
    ``<stem>-<format>.gguf`` per format (quantized ones through llama.cpp's quantizer); {format: path}.

    ``loaded``: the base's (model, tokenizer) when the caller already holds them (check_export's floors).
    """
    base, tokenizer = loaded or load_base(model_spec, quant_spec)
    tmp = out_dir / f".{stem}-hf.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    base.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    del base
    try:
        return export_formats(tmp, out_dir, formats, stem=stem, chat_template=chat_template, pre=pre)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
