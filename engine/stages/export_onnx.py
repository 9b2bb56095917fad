"""export_onnx: the merged model as ONNX with a KV cache, for onnxruntime.

Writes run_dir/export/model.onnx (+ model.onnx.data when the weights are large) and adds it to
export/manifest.json (kind ``onnx``, bytes) next to whatever export_gguf listed there;
check_export then runs it in onnxruntime against the merged HF model. Needs merge earlier in
the stage list. The work is engine/export/onnx.py.
"""

from __future__ import annotations

from engine.context import RunContext
from engine.export.write import write_onnx_files
from engine.files import shown_path
from engine.stages.registry import STAGES


@STAGES.register("export_onnx", traits=("needs:merged",))
def export_onnx(ctx: RunContext) -> dict:
    """Merged model -> export/model.onnx (inputs ids, mask, positions, past key/values; outputs logits, present)."""
    out = ctx.run_dir / "export"
    files = write_onnx_files(ctx.run_dir / "merged", out) if ctx.is_main else {}
    ctx.accelerator.wait_for_everyone()
    return {"dir": shown_path(out, ctx.run_dir), "files": files}
