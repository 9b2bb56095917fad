"""export_gguf: the merged model as GGUF files, and the LoRA adapter alone as a GGUF adapter.

Writes run_dir/export/: ``model-<format>.gguf`` per ``export.formats``; with ``export.lora``
and a trained LoRA, ``adapter-lora.gguf`` plus the base it applies to; manifest.json lists
every file (check_export adds the parity numbers). Needs merge earlier in the stage list.
The work is engine/export/write.py (and gguf.py, our HF -> GGUF writer).
"""

from __future__ import annotations

from engine.context import RunContext
from engine.export.merge import trained_weights
from engine.export.write import write_gguf_files
from engine.files import shown_path
from engine.stages.registry import STAGES


@STAGES.register("export_gguf", traits=("needs:merged",))
def export_gguf(ctx: RunContext) -> dict:
    """Merged model -> GGUF in each export.formats; the LoRA alone -> a GGUF adapter for llama.cpp."""
    cfg, out, evaluated = ctx.cfg, ctx.run_dir / "export", ctx.cfg.evaluated_run
    files: dict[str, dict] = {}
    if ctx.is_main:
        trained = trained_weights(ctx.run_dir, evaluated.path if evaluated else None, cfg.adapter)
        merged = ctx.run_dir / "merged"
        files = write_gguf_files(merged, out, cfg.export, model_spec=cfg.model, quant_spec=cfg.quantization, trained=trained)
    ctx.accelerator.wait_for_everyone()
    return {"dir": shown_path(out, ctx.run_dir), "files": files}
