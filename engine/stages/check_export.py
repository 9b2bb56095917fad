"""check_export: every exported file against the HF model, on the same held-out token ids.

A full-model GGUF, and the ONNX file (in onnxruntime), are compared with the merged HF model;
the LoRA GGUF, applied by llama.cpp on its base GGUF, with the HF base + adapter(s), and held to
the base file's own floor (how well the base GGUF alone agrees with the HF base) minus
``export.check.lora_margin``. The numbers go to metrics.json and export/manifest.json; any
number past its threshold fails the stage with all of them. This stage picks the held-out cases
and records the result; the work is ``engine.export.check.check_files``.
"""

from __future__ import annotations

from engine.errors import UserError
from engine.stages.merge import trained_of
from engine.stages.prepare_data import ensure_data
from engine.stages.registry import STAGES


@STAGES.register("check_export")
def check_export(ctx) -> dict:
    """Top-1, max |dlogit| and greedy agreement of each exported file; chat template ids."""
    from engine.export.check import CheckJob, check_files, held_out_cases
    from engine.export.manifest import MANIFEST, read_manifest, write_manifest

    cfg, out = ctx.cfg, ctx.run_dir / "export"
    if not (out / MANIFEST).is_file():
        raise UserError(f"check_export: {out / MANIFEST} is missing; run export_gguf or export_onnx before check_export")
    ensure_data(ctx)
    spec, files = cfg.export.check, read_manifest(out)
    results, problems = {}, []
    if ctx.is_main:
        data, tokenizer = ctx.data, ctx.tokenizer()
        # The held-out split (the training split if none is held out), fed as identical ids to both sides.
        examples = data.splits.get(cfg.eval.split) or data.splits["train"]
        prompt_text = data.prompt_text if data.template else None
        cases = held_out_cases(examples, tokenizer, prompts=spec.prompts, max_tokens=spec.max_tokens, prompt_text=prompt_text)
        lora = any(e["kind"] == "lora" for e in files.values())
        job = CheckJob(
            files=files,
            export_dir=out,
            merged_dir=ctx.run_dir / "merged",
            cases=cases,
            spec=spec,
            model=cfg.model,
            quantization=cfg.quantization,
            trained=trained_of(ctx) if lora else None,
        )
        results, problems = check_files(job)
        for name, numbers in results.items():
            files[name]["parity"] = numbers
        write_manifest(out, files)
    ctx.accelerator.wait_for_everyone()
    metrics = {"prompts": spec.prompts, "files": results}
    if problems:
        ctx.record("check_export", {**metrics, "passed": False, "problems": problems})
        raise UserError("check_export: the exported files disagree with the trained model:\n  - " + "\n  - ".join(problems))
    return {**metrics, "passed": True}
