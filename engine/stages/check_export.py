"""check_export: every exported file against the HF model, on the same held-out token ids.

A full-model GGUF, and the ONNX file (in onnxruntime), are compared with the merged HF model;
the LoRA GGUF, applied by llama.cpp on its base GGUF, with the HF base + adapter(s), and held to
the base file's own floor (how well the base GGUF alone agrees with the HF base) minus
``export.check.lora_margin``. The numbers go to metrics.json and export/manifest.json; any
number past its threshold fails the stage with all of them, after the recipe's report stage has
written the Export table with the failing rows marked (trait ``reports_failure``). A quantised
file is held to the floor of its format (``engine.export.check.quantization_floors``). The held-out cases come from
``eval.split`` of the prepared data (the training split if none is held out), fed as identical
ids to both sides. The work is ``engine.export.check.check_export_dir``.
"""

from __future__ import annotations

from engine.context import RunContext
from engine.errors import UserError
from engine.export.check import check_export_dir, exported_files
from engine.export.merge import trained_weights
from engine.stages.registry import STAGES


@STAGES.register("check_export", traits=("needs:data", "reports_failure"))
def check_export(ctx: RunContext) -> dict:
    """Top-1, max |dlogit| and greedy agreement of each exported file; chat template ids."""
    cfg, out, data, evaluated = ctx.cfg, ctx.run_dir / "export", ctx.data, ctx.cfg.evaluated_run
    files, spec = exported_files(out), cfg.export.check
    results, problems = {}, []
    if ctx.is_main:
        results, problems = check_export_dir(
            files,
            out,
            ctx.run_dir / "merged",
            data.splits.get(cfg.eval.split) or data.splits["train"],
            ctx.tokenizer(),
            spec=spec,
            prompt_text=data.prompt_text if data.template else None,
            model=cfg.model,
            quantization=cfg.quantization,
            trained=lambda: trained_weights(ctx.run_dir, evaluated.path if evaluated else None, cfg.adapter),
        )
    ctx.accelerator.wait_for_everyone()
    metrics = {"prompts": spec.prompts, "files": results}
    if problems:
        ctx.record("check_export", {**metrics, "passed": False, "problems": problems})
        raise UserError("check_export: the exported files disagree with the trained model:\n  - " + "\n  - ".join(problems))
    return {**metrics, "passed": True}
