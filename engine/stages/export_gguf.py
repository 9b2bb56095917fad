"""export_gguf: the merged model as GGUF files, and the LoRA adapter alone as a GGUF adapter.

Writes run_dir/export/: ``model-<format>.gguf`` per ``export.formats``; with ``export.lora``
and a trained LoRA, ``adapter-lora.gguf`` plus the base it applies to (the packaged GGUF the
run started from, or ``base-<f32|f16>.gguf`` written here). manifest.json lists every file
with its size, and a LoRA's base by package + file or by its name in export/ (no local path:
``engine.export.manifest.base_gguf_of`` resolves it); check_export adds the parity numbers.

Layered adapters (train_layered): one ``adapter-lora.gguf`` holds every level, stacked along
the rank with each level's scale folded into its B, i.e. exactly the update merge folds into
model-*.gguf and the model check_export compares with. Why not one file per level: llama.cpp
would apply them at whatever scales a user passes, and only the stack as trained is checked.
The work is engine/export/gguf.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from engine.stages.merge import ensure_merged, trained_of
from engine.stages.registry import STAGES


@STAGES.register("export_gguf")
def export_gguf(ctx) -> dict:
    """Merged model -> GGUF in each export.formats; the LoRA alone -> a GGUF adapter for llama.cpp."""
    from engine.export.gguf import export_formats, write_lora_gguf
    from engine.export.manifest import read_manifest, write_manifest
    from engine.files import shown_path

    cfg, spec = ctx.cfg, ctx.cfg.export
    merged = ensure_merged(ctx)
    out = ctx.run_dir / "export"
    template = _template(merged)
    pre = _source_pre(cfg.model)
    files: dict[str, dict] = {}
    if ctx.is_main:
        for fmt, path in export_formats(merged, out, spec.formats, stem="model", chat_template=template, pre=pre).items():
            files[path.name] = {"kind": "model", "format": fmt}
        trained = trained_of(ctx)
        if spec.lora and trained.is_lora:
            base, base_format = _base_gguf(ctx, out, template, pre)
            config = json.loads((merged / "config.json").read_text())
            lora = write_lora_gguf(trained, config, out / "adapter-lora.gguf")
            files[lora.name] = {"kind": "lora", "base": base, "base_format": base_format}
            if trained.levels:
                files[lora.name] |= {"levels": trained.levels, "scales": trained.scales}
        for name, entry in files.items():
            entry["bytes"] = (out / name).stat().st_size
        earlier = read_manifest(out)
        onnx = {n: e for n, e in earlier.items() if e["kind"] == "onnx"}  # export_onnx may have run first
        write_manifest(out, onnx | files)
    ctx.accelerator.wait_for_everyone()
    return {"dir": shown_path(out, ctx.run_dir), "files": files}


def _template(merged: Path) -> str:
    """The training template merge saved with the tokenizer."""
    jinja = merged / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    return json.loads((merged / "tokenizer_config.json").read_text()).get("chat_template") or ""


def _source_pre(model_spec) -> str | None:
    """The pre-tokenizer name of the packaged GGUF the run started from (exact, not re-derived)."""
    if model_spec.kind != "gguf":
        return None
    from engine.export import gguf_header_string
    from engine.model import gguf_path

    return gguf_header_string(gguf_path(model_spec.package, model_spec.file), "tokenizer.ggml.pre")


def _base_gguf(ctx, out: Path, template: str, pre: str | None) -> tuple[dict, str]:
    """The base GGUF a LoRA adapter applies to, as the manifest records it (``base_entry``), and its format:
    the packaged file itself, else the base written here."""
    from engine.export.gguf import write_gguf
    from engine.export.manifest import base_entry
    from engine.export.merge import load_base

    cfg = ctx.cfg
    if cfg.model.kind == "gguf":
        from engine.model import gguf_path

        path = gguf_path(cfg.model.package, cfg.model.file)
        return base_entry(path, out, package=cfg.model.package, file=cfg.model.file), path.stem.rsplit(".", 1)[-1]
    fmt = "f32" if "f32" in cfg.export.formats else "f16"
    base, tokenizer = load_base(cfg.model, cfg.quantization)
    tmp = out / ".base-hf.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    base.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    path = write_gguf(tmp, out / f"base-{fmt}.gguf", fmt, chat_template=template, pre=pre)
    shutil.rmtree(tmp, ignore_errors=True)
    return base_entry(path, out), fmt
