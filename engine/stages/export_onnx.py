"""export_onnx: the merged model as ONNX with a KV cache, for onnxruntime.

Writes run_dir/export/model.onnx (+ model.onnx.data when the weights are large) and adds it to
export/manifest.json (kind ``onnx``, bytes) next to whatever export_gguf listed there;
check_export then runs it in onnxruntime against the merged HF model. The work is
engine/export/onnx.py.
"""

from __future__ import annotations

from engine.stages.merge import ensure_merged
from engine.stages.registry import STAGES


@STAGES.register("export_onnx")
def export_onnx(ctx) -> dict:
    """Merged model -> export/model.onnx (inputs ids, mask, positions, past key/values; outputs logits, present)."""
    from engine.export.manifest import read_manifest, write_manifest
    from engine.export.onnx import write_onnx
    from engine.files import shown_path

    merged = ensure_merged(ctx)
    out = ctx.run_dir / "export"
    files: dict[str, dict] = {}
    if ctx.is_main:
        written = write_onnx(merged, out / "model.onnx")
        entry = {"kind": "onnx", "format": "onnx", "bytes": sum(p.stat().st_size for p in written)}
        if len(written) > 1:
            entry["data"] = written[1].name
        files[written[0].name] = entry
        write_manifest(out, read_manifest(out) | files)  # next to whatever export_gguf listed
    ctx.accelerator.wait_for_everyone()
    return {"dir": shown_path(out, ctx.run_dir), "files": files}
