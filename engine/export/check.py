"""Parity of an exported file with the HF model it came from, on identical token ids.

Why token ids and not text: the same prompt *text* can tokenize differently on the two sides
(special tokens, BOS), and then a correct export looks broken or a broken one looks fine.
Both sides get the same ids; what differs is then the weights and the kernels.

Three numbers per file, each held to a threshold of its format (``export.check``):
  top1        teacher-forced: share of positions whose most likely next token agrees;
  max_dlogit  largest |logit difference| over those positions and the whole vocabulary;
  greedy      greedy continuation from each prompt: share of tokens before the first difference.
An ONNX file (engine.export.onnx) runs in onnxruntime; its greedy decoding goes through the
exported KV cache, so a broken cache shows as a greedy disagreement.
Plus one yes/no for a GGUF: the chat template embedded in the GGUF renders the prompt to the same ids
as the training template, so llama.cpp's chat API talks to the model the way it was trained.

``check_files(CheckJob(...))`` checks every file a manifest lists and returns the numbers, each
with the thresholds it was held to and whether it passed, plus every failure said in words; the
check_export stage only picks the cases (``held_out_cases``) and records the result.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engine.errors import UserError
from engine.export.manifest import MANIFEST, base_gguf_of, read_manifest, write_manifest
from engine.native import check_llama_cpp


@dataclass(frozen=True)
class Case:
    """One held-out example: ids for teacher forcing, the prompt's ids and its messages."""

    forced: list[int]
    prompt: list[int]
    messages: list[dict]


@dataclass(frozen=True)
class Parity:
    top1: float
    max_dlogit: float
    greedy: float
    positions: int

    def as_dict(self) -> dict:
        return {k: round(v, 6) if isinstance(v, float) else v for k, v in asdict(self).items()}


# --- the two sides -----------------------------------------------------------------------


def hf_logits(model, ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids], device=model.device)).logits[0].float().cpu().numpy()


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    """n argmax tokens, EOS not special: both sides follow the same rule to the end.

    The whole sequence is recomputed per token (no KV cache): a few prompts of a few tokens,
    and no dependence on the cache API of the transformers version at hand.
    """
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(hf_logits(model, ids)[-1].argmax()))
    return ids[len(prompt) :]


def open_gguf(path: Path, *, n_ctx: int, lora: Path | None = None, threads: int | None = None):
    """A llama.cpp model with every position's logits kept and an f32 KV cache (an f16 cache
    would add its own rounding to what is measured)."""
    check_llama_cpp()
    from llama_cpp import GGML_TYPE_F32, Llama

    return Llama(
        str(path),
        n_ctx=n_ctx,
        logits_all=True,
        lora_path=str(lora) if lora else None,
        type_k=GGML_TYPE_F32,
        type_v=GGML_TYPE_F32,
        n_threads=threads,
        verbose=False,
    )


def gguf_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def gguf_greedy(llm, prompt: list[int], n: int) -> list[int]:
    llm.reset()
    llm.eval(prompt)
    out: list[int] = []
    for _ in range(n):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval(out[-1:])
    return out


def onnx_logits(lm, ids: list[int]) -> np.ndarray:
    return lm.logits(ids)


def onnx_greedy(lm, prompt: list[int], n: int) -> list[int]:
    """Through the exported KV cache: the prompt once, then one token per step."""
    return lm.greedy(prompt, n)


# --- comparing ---------------------------------------------------------------------------


def parity(reference, llm, cases: list[Case], *, new_tokens: int, logits=gguf_logits, greedy=gguf_greedy) -> Parity:
    """Teacher-forced top-1 and max |dlogit| over every position, greedy agreement per prompt.

    ``logits`` and ``greedy`` run the exported side (llama.cpp by default; ``onnx_logits`` and
    ``onnx_greedy`` for an ``engine.export.onnx.OnnxLM``).
    """
    agree = total = 0
    worst = 0.0
    shares = []
    for case in cases:
        ref, got = hf_logits(reference, case.forced), logits(llm, case.forced)
        if ref.shape != got.shape:
            raise UserError(f"export check: logits shapes differ (HF {ref.shape}, export {got.shape}); vocab sizes disagree")
        agree += int((ref.argmax(-1) == got.argmax(-1)).sum())
        total += len(case.forced)
        worst = max(worst, float(np.abs(ref - got).max()))
        shares.append(_prefix_share(hf_greedy(reference, case.prompt, new_tokens), greedy(llm, case.prompt, new_tokens)))
    return Parity(top1=agree / max(total, 1), max_dlogit=worst, greedy=float(np.mean(shares)), positions=total)


def _prefix_share(a: list[int], b: list[int]) -> float:
    same = 0
    for x, y in zip(a, b, strict=True):
        if x != y:
            break
        same += 1
    return same / max(len(a), 1)


def template_agrees(llm, tokenizer, cases: list[Case], train_template: str) -> dict:
    """The GGUF's own chat template, rendered as llama-cpp-python's chat API renders it, vs the training template.

    ``same_text``: the embedded template renders the training prompts' text (the template is right);
    ``same_ids``: llama.cpp's own tokenizer turns that text into the training ids. For a byte-level BPE
    both must hold. For a SentencePiece vocabulary llama.cpp's tokenizer puts ``▁`` before text runs
    by its own rule, not transformers' (docs/export.md): ``same_ids`` is recorded, not required, since
    engine and any caller that passes ids get the trained ids; the text must still be the same.
    """
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    from engine.data.templates import render

    embedded = llm.metadata.get("tokenizer.chat_template")
    if not embedded:
        return {"embedded": False, "same_ids": False}
    eos = tokenizer.eos_token or ""
    formatter = Jinja2ChatFormatter(template=embedded, eos_token=eos, bos_token=tokenizer.bos_token or "")
    same_text = same_ids = True
    for case in cases:
        text = formatter(messages=case.messages).prompt
        ours = render(train_template, case.messages, add_generation_prompt=True, tokenizer=tokenizer)
        same_text &= text == ours
        trained = tokenizer(ours, add_special_tokens=False).input_ids
        same_ids &= llm.tokenize(text.encode(), add_bos=False, special=True) == trained
    sentencepiece = llm.metadata.get("tokenizer.ggml.model") == "llama"
    return {"embedded": True, "same_ids": bool(same_ids), "same_text": bool(same_text), "ids_required": not sentencepiece}


def failures(
    name: str, got: Parity, *, top1: float | None, max_dlogit: float | None, greedy: float | None, floor: Parity | None = None
) -> list[str]:
    """Each number below (or above) its threshold, said with both values and by how much; a quantised
    file's limits are its floor's numbers minus ``export.check.quant_margin``, said so."""

    def source(key: str) -> str:
        if floor is None or key != "top1":
            return f"export.check.{key}"
        return f"the untrained base's own {key} in this format, {getattr(floor, key):.4f}, minus export.check.quant_margin"

    out = []
    if top1 is not None and got.top1 < top1:
        out.append(f"{name}: top-1 agreement {got.top1:.4f} < {top1} by {top1 - got.top1:.4f} ({source('top1')})")
    if max_dlogit is not None and got.max_dlogit > max_dlogit:
        out.append(f"{name}: max |dlogit| {got.max_dlogit:.4g} > {max_dlogit} (export.check.max_dlogit)")
    if greedy is not None and got.greedy < greedy:
        out.append(f"{name}: greedy agreement {got.greedy:.3f} < {greedy} by {greedy - got.greedy:.3f} ({source('greedy')})")
    return out


# --- every file of a manifest ------------------------------------------------------------


def held_out_cases(
    examples: list, tokenizer, *, prompts: int, max_tokens: int, prompt_text: Callable | None = None
) -> list[Case]:
    """The first ``prompts`` examples as cases: ``max_tokens`` ids teacher-forced, the prompt's ids.

    Args:
        examples: tokenized examples (``input_ids``, ``prompt_messages``), held-out ones first choice.
        tokenizer: the run's tokenizer (the ids both sides are fed).
        prompts: how many examples; max_tokens: teacher-forced ids per example (truncated).
        prompt_text: ``(example, tokenizer) -> str``, the templated prompt of a chat example; None
            for plain-text data, which has no prompt/answer turns: its first 8 tokens are the prompt.
    """
    cases = []
    for ex in examples[:prompts]:
        text = prompt_text(ex, tokenizer) if prompt_text is not None else None
        prompt = tokenizer(text, add_special_tokens=False).input_ids if text is not None else ex.input_ids[:8]
        cases.append(Case(forced=ex.input_ids[:max_tokens], prompt=prompt[-max_tokens:], messages=ex.prompt_messages))
    return cases


@dataclass(frozen=True)
class CheckJob:
    """What ``check_files`` compares, as plain values (the check_export stage fills it from the run)."""

    files: dict[str, dict]
    """manifest.json's ``files``: name -> entry (kind model | onnx | lora, format, base of a lora)."""
    export_dir: Path
    """Where the files are (the manifest's dir)."""
    merged_dir: Path
    """The merged HF model dir: the reference of full-model and ONNX files; its tokenizer holds the training template."""
    cases: list[Case]
    spec: Any
    """Thresholds and lengths (``engine.export.CheckSpec``)."""
    model: Any = None
    """The base model spec a LoRA file's reference is built from (with ``quantization`` and ``trained``)."""
    quantization: Any = None
    trained: Any = None
    """The run's trained weights (``engine.export.merge.Trained``); needed only when a LoRA file is listed."""
    threads: int | None = None
    """llama.cpp threads (None: its default)."""


def check_files(job: CheckJob) -> tuple[dict, list[str]]:
    """Every listed file against its HF reference; returns (numbers per file, failures in words).

    Each file's numbers carry ``limits`` (the thresholds it was held to, None where none) and
    ``passed``, so a reader of the manifest or the report needs no config to judge them. A
    quantised file is held to its format's floor (``quantization_floors``), measured first.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine.export.gguf import QUANTIZED

    spec, cases = job.spec, job.cases
    n_ctx = max(len(c.forced) for c in cases) + max(len(c.prompt) for c in cases) + spec.new_tokens + 8
    tokenizer = AutoTokenizer.from_pretrained(job.merged_dir)
    template = tokenizer.chat_template or ""
    results, problems = {}, []
    models = {n: e for n, e in job.files.items() if e["kind"] == "model"}
    onnx = {n: e for n, e in job.files.items() if e["kind"] == "onnx"}
    quantized = sorted({e["format"] for e in models.values() if e["format"] in QUANTIZED})
    floors = quantization_floors(job, quantized, n_ctx, template) if quantized and job.model is not None else {}
    if models or onnx:
        reference = AutoModelForCausalLM.from_pretrained(job.merged_dir).float().eval()
        for name, entry in models.items():
            fmt = entry["format"]
            results[name], more = _check_gguf(
                reference, job.export_dir / name, fmt, tokenizer, template, job, n_ctx, floor=floors.get(fmt)
            )
            problems += more
        for name in onnx:
            results[name], more = _check_onnx(reference, job.export_dir / name, cases, spec)
            problems += more
        del reference
    for name, entry in job.files.items():
        if entry["kind"] == "lora":
            results[name], more = _check_lora(job, job.export_dir / name, entry, n_ctx)
            problems += more
    return results, problems


def quantization_floors(job: CheckJob, formats: list[str], n_ctx: int, template: str) -> dict[str, Parity]:
    """What each quantised format costs by itself: the same format made from the untrained base
    (our writer, llama.cpp's quantizer, as the exported file was made), against the HF base, on
    the same ids. Why: a trained model's agreement under 4-bit rounding varies from run to run
    around a value set by the architecture and the format (SmolLM2 Q4_K_M: 0.849 and 0.875 on two
    runs of one recipe), so an absolute threshold is a coin toss; a floor measured here is not.
    The files are written to a temporary folder in the export dir and removed."""
    import tempfile

    from engine.export.merge import load_base
    from engine.export.write import base_gguf_files, source_pre

    model, tokenizer = load_base(job.model, job.quantization)
    floors = {}
    with tempfile.TemporaryDirectory(dir=job.export_dir, prefix=".floor-") as tmp:
        files = base_gguf_files(
            job.model, job.quantization, Path(tmp), formats, stem="floor", chat_template=template,
            pre=source_pre(job.model), loaded=(model, tokenizer),
        )  # fmt: skip
        for fmt, path in files.items():
            llm = open_gguf(path, n_ctx=n_ctx, threads=job.threads)
            try:
                floors[fmt] = parity(model, llm, job.cases, new_tokens=job.spec.new_tokens)
            finally:
                llm.close()
    return floors


def exported_files(export_dir: Path) -> dict[str, dict]:
    """The manifest's files, or a UserError that says which stage writes them (checked on every rank)."""
    if not (export_dir / MANIFEST).is_file():
        raise UserError(f"check_export: {export_dir / MANIFEST} is missing; run export_gguf or export_onnx before check_export")
    return read_manifest(export_dir)


def check_export_dir(
    files: dict[str, dict],
    export_dir: Path,
    merged_dir: Path,
    examples: list,
    tokenizer,
    *,
    spec,
    prompt_text: Callable | None,
    model: Any,
    quantization: Any,
    trained: Callable[[], Any],
) -> tuple[dict, list[str]]:
    """Held-out cases from ``examples``, every file of the manifest checked, the numbers written into it.

    Returns (numbers per file, failures in words), as ``check_files``; ``files`` is the manifest's
    (``exported_files``) and gets each file's ``parity``. ``trained`` finds the trained weights; it is
    called only when the manifest has a LoRA file (a full-model export needs none, and may have none).
    """
    cases = held_out_cases(examples, tokenizer, prompts=spec.prompts, max_tokens=spec.max_tokens, prompt_text=prompt_text)
    lora = any(e["kind"] == "lora" for e in files.values())
    job = CheckJob(
        files=files,
        export_dir=export_dir,
        merged_dir=merged_dir,
        cases=cases,
        spec=spec,
        model=model,
        quantization=quantization,
        trained=trained() if lora else None,
    )
    results, problems = check_files(job)
    for name, numbers in results.items():
        files[name]["parity"] = numbers
    write_manifest(export_dir, files)
    return results, problems


def _limits(spec, fmt: str, floor: Parity | None = None) -> dict:
    """The thresholds of a format. A quantised format's top-1 limit is its floor minus ``quant_margin`` (or
    what ``top1`` lists for it, if higher); its greedy agreement is held to what ``greedy`` lists, if anything."""
    limits = {"top1": spec.top1.get(fmt), "max_dlogit": spec.max_dlogit.get(fmt), "greedy": spec.greedy.get(fmt)}
    if floor is not None:
        relative = round(floor.top1 - spec.quant_margin, 6)
        limits["top1"] = relative if limits["top1"] is None else max(limits["top1"], relative)
    return limits


def _check_gguf(
    reference, path: Path, fmt: str, tokenizer, template: str, job: CheckJob, n_ctx: int, *, floor: Parity | None = None
) -> tuple[dict, list[str]]:
    """A full-model GGUF vs the merged HF model, and its embedded chat template vs the training one.

    ``floor``: for a quantised format, the same format made from the untrained base vs the HF base."""
    llm = open_gguf(path, n_ctx=n_ctx, threads=job.threads)
    try:
        got = parity(reference, llm, job.cases, new_tokens=job.spec.new_tokens)
        chat = template_agrees(llm, tokenizer, job.cases, template) if template else {"embedded": False, "same_ids": None}
    finally:
        llm.close()
    limits = _limits(job.spec, fmt, floor)
    problems = failures(path.name, got, **limits, floor=floor)
    if chat.get("same_text") is False:
        problems.append(f"{path.name}: its embedded chat template renders different text than the training template")
    elif chat["same_ids"] is False and chat.get("ids_required", True):
        problems.append(f"{path.name}: its embedded chat template renders different token ids than the training template")
    numbers = {**got.as_dict(), "chat_template": chat, "limits": limits, "passed": not problems}
    if floor is not None:
        numbers["floor"] = floor.as_dict()
    return numbers, problems


def _check_onnx(reference, path: Path, cases: list[Case], spec) -> tuple[dict, list[str]]:
    """The ONNX file in onnxruntime vs the merged HF model; greedy decoding goes through its KV cache."""
    from engine.export.onnx import OnnxLM

    got = parity(reference, OnnxLM(path), cases, new_tokens=spec.new_tokens, logits=onnx_logits, greedy=onnx_greedy)
    limits = _limits(spec, "onnx")
    problems = failures(path.name, got, **limits)
    return {**got.as_dict(), "limits": limits, "passed": not problems}, problems


def _check_lora(job: CheckJob, path: Path, entry: dict, n_ctx: int) -> tuple[dict, list[str]]:
    """The adapter on its base GGUF vs HF base + adapter(s), against the base file's own floor."""
    from engine.export.merge import load_trained

    spec = job.spec
    reference, _ = load_trained(job.model, job.quantization, job.trained)
    base = base_gguf_of(entry, job.export_dir)
    llm = open_gguf(base, n_ctx=n_ctx, threads=job.threads)
    try:
        with reference.disable_adapter():
            floor = parity(reference, llm, job.cases, new_tokens=spec.new_tokens)
    finally:
        llm.close()
    llm = open_gguf(base, n_ctx=n_ctx, lora=path, threads=job.threads)
    try:
        got = parity(reference, llm, job.cases, new_tokens=spec.new_tokens)
    finally:
        llm.close()
    need = round(floor.top1 - spec.lora_margin, 6)
    limits = {"top1": need, "max_dlogit": None, "greedy": None}
    problems = failures(f"{path.name} on {base.name}", got, **limits)
    numbers = {**got.as_dict(), "base_floor": floor.as_dict(), "top1_needed": need, "limits": limits, "passed": not problems}
    return numbers, problems
