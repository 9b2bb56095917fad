"""check_export: every exported file against the HF model, on the same held-out token ids.

A full-model GGUF, and the ONNX file (in onnxruntime), are compared with the merged HF model;
the LoRA GGUF, applied by llama.cpp on its base GGUF, with the HF base + adapter, and held to
the base file's own floor (how well the base GGUF alone agrees with the HF base) minus
``export.check.lora_margin``. The numbers go to metrics.json and export/manifest.json; any
number past its threshold fails the stage with all of them. The work is engine/export/check.py.
"""

from __future__ import annotations

import json

from engine.errors import UserError
from engine.stages.merge import trained_of
from engine.stages.prepare_data import ensure_data
from engine.stages.registry import STAGES


@STAGES.register("check_export")
def check_export(ctx) -> dict:
    """Top-1, max |dlogit| and greedy agreement of each exported file; chat template ids."""
    manifest_path = ctx.run_dir / "export" / "manifest.json"
    if not manifest_path.is_file():
        raise UserError(f"check_export: {manifest_path} is missing; run export_gguf or export_onnx before check_export")
    ensure_data(ctx)
    manifest = json.loads(manifest_path.read_text())
    results, problems = {}, []
    if ctx.is_main:
        cases = _cases(ctx)
        results, problems = _check_all(ctx, manifest["files"], cases)
        for name, numbers in results.items():
            manifest["files"][name]["parity"] = numbers
        manifest_path.write_text(json.dumps(manifest, indent=2))
    ctx.accelerator.wait_for_everyone()
    metrics = {"prompts": ctx.cfg.export.check.prompts, "files": results}
    if problems:
        ctx.record("check_export", {**metrics, "passed": False, "problems": problems})
        raise UserError("check_export: the exported files disagree with the trained model:\n  - " + "\n  - ".join(problems))
    return {**metrics, "passed": True}


def _cases(ctx):
    """The first ``export.check.prompts`` held-out examples as token ids (training split if none held out)."""
    from engine.export.check import Case

    spec, tokenizer, data = ctx.cfg.export.check, ctx.tokenizer(), ctx.data
    examples = data.splits.get(ctx.cfg.eval.split) or data.splits["train"]
    cases = []
    for ex in examples[: spec.prompts]:
        # Plain-text data has no prompt/answer turns: the example's first tokens are the prompt.
        text = data.prompt_text(ex, tokenizer) if data.template else None
        prompt = tokenizer(text, add_special_tokens=False).input_ids if text is not None else ex.input_ids[:8]
        cases.append(Case(forced=ex.input_ids[: spec.max_tokens], prompt=prompt[-spec.max_tokens :], messages=ex.prompt_messages))
    return cases


def _check_all(ctx, files: dict, cases) -> tuple[dict, list[str]]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine.export.check import failures, open_gguf, parity, template_agrees

    spec, out = ctx.cfg.export.check, ctx.run_dir / "export"
    n_ctx = max(len(c.forced) for c in cases) + max(len(c.prompt) for c in cases) + spec.new_tokens + 8
    merged_dir = ctx.run_dir / "merged"
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    template = tokenizer.chat_template or ""
    results, problems = {}, []
    models = {n: e for n, e in files.items() if e["kind"] == "model"}
    onnx = {n: e for n, e in files.items() if e["kind"] == "onnx"}
    if models or onnx:
        reference = AutoModelForCausalLM.from_pretrained(merged_dir).float().eval()
        for name, entry in models.items():
            fmt = entry["format"]
            llm = open_gguf(out / name, n_ctx=n_ctx)
            try:
                got = parity(reference, llm, cases, new_tokens=spec.new_tokens)
                chat = template_agrees(llm, tokenizer, cases, template) if template else {"embedded": False, "same_ids": None}
            finally:
                llm.close()
            results[name] = {**got.as_dict(), "chat_template": chat}
            limits = {"top1": spec.top1.get(fmt), "max_dlogit": spec.max_dlogit.get(fmt), "greedy": spec.greedy.get(fmt)}
            problems += failures(name, got, **limits)
            if chat["same_ids"] is False:
                problems.append(f"{name}: its embedded chat template renders different token ids than the training template")
        for name in onnx:
            results[name], more = _check_onnx(reference, out / name, cases, spec)
            problems += more
        del reference
    for name, entry in files.items():
        if entry["kind"] == "lora":
            results[name], more = _check_lora(ctx, out / name, entry, cases, n_ctx)
            problems += more
    return results, problems


def _check_onnx(reference, path, cases, spec) -> tuple[dict, list[str]]:
    """The ONNX file in onnxruntime vs the merged HF model; greedy decoding goes through its KV cache."""
    from engine.export.check import failures, onnx_greedy, onnx_logits, parity
    from engine.export.onnx import OnnxLM

    got = parity(reference, OnnxLM(path), cases, new_tokens=spec.new_tokens, logits=onnx_logits, greedy=onnx_greedy)
    limits = {"top1": spec.top1.get("onnx"), "max_dlogit": spec.max_dlogit.get("onnx"), "greedy": spec.greedy.get("onnx")}
    return got.as_dict(), failures(path.name, got, **limits)


def _check_lora(ctx, path, entry: dict, cases, n_ctx: int) -> tuple[dict, list[str]]:
    """The adapter on its base GGUF vs HF base + adapter, against the base file's own floor."""
    from pathlib import Path

    from engine.export.check import failures, open_gguf, parity
    from engine.export.merge import load_trained

    spec, cfg = ctx.cfg.export.check, ctx.cfg
    reference, _ = load_trained(cfg.model, cfg.quantization, trained_of(ctx))
    base = Path(entry["base"])
    llm = open_gguf(base, n_ctx=n_ctx)
    try:
        with reference.disable_adapter():
            floor = parity(reference, llm, cases, new_tokens=spec.new_tokens)
    finally:
        llm.close()
    llm = open_gguf(base, n_ctx=n_ctx, lora=path)
    try:
        got = parity(reference, llm, cases, new_tokens=spec.new_tokens)
    finally:
        llm.close()
    need = round(floor.top1 - spec.lora_margin, 6)
    numbers = {**got.as_dict(), "base_floor": floor.as_dict(), "top1_needed": need}
    return numbers, failures(f"{path.name} on {base.name}", got, top1=need, max_dlogit=None, greedy=None)
