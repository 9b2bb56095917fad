"""The ``export`` group: what leaves Python after training, and how closely it must agree.

Kinds:
  gguf  the merged model as GGUF files for llama.cpp (f32, f16, bf16, and q8_0 / Q4_K_M /
        Q5_K_M / Q6_K through llama.cpp's own quantizer), plus the LoRA adapter alone as a
        GGUF adapter that llama.cpp applies on the base GGUF without merging. What the writer
        covers: architectures Llama, Mistral, Qwen2 and Phi-2 (``SUPPORTED``); byte-level BPE and
        SentencePiece vocabularies (``TOKENIZER_KINDS``); default, linear and llama3 rope
        (``ROPE_TYPES``). That is every shipped model preset (SmolLM2, TinyLlama, Llama 3, Mistral
        v0.3, Qwen2.5, Phi-2; docs/export.md has the table). A model outside it is refused at
        validation (``export_refusal``: exit 2, before training), naming what it has and what works.

The export_onnx stage (the merged model as ONNX with a KV cache, engine/export/onnx.py) needs
no settings of its own; check_export holds it to the ``onnx`` entries of ``export.check``.

The work is in this package and takes plain arguments: ``merge`` (adapter folded into the
base, a standard HF dir), ``gguf`` (our HF -> GGUF writer), ``write`` (what export_gguf and
export_onnx leave in run_dir/export: the files, a LoRA's base GGUF, the manifest), ``check``
(parity of an exported file against the HF model on identical token ids). The stages merge,
export_gguf, export_onnx and check_export call them; a check below its thresholds fails the
stage with the numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import Field

from engine.errors import UserError
from engine.registry import Registry, Spec, Strict

EXPORTS = Registry("export")

GgufFormat = Literal["f32", "f16", "bf16", "q8_0", "Q4_K_M", "Q5_K_M", "Q6_K"]

# HF architecture -> (GGUF architecture, q/k rows permuted for llama.cpp's rotary layout).
# Mistral and Llama 3 are the llama architecture in llama.cpp; SmolLM2 and TinyLlama are Llama.
# Qwen2 and Phi-2 rotate halves (neox rotary) in both HF and llama.cpp: their rows stay as they are.
SUPPORTED: dict[str, tuple[str, bool]] = {
    "LlamaForCausalLM": ("llama", True),
    "MistralForCausalLM": ("llama", True),
    "Qwen2ForCausalLM": ("qwen2", False),
    "PhiForCausalLM": ("phi2", False),
}


ROPE_TYPES = ("default", "linear", "llama3")
"""Rope scalings the writer puts into a GGUF (``rope_type`` of config.json); validation refuses others."""


def rope_type(config: dict) -> str:
    """``rope_type`` of an HF config: transformers 5 keeps it in ``rope_parameters``, older files in ``rope_scaling``."""
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    return rope.get("rope_type") or rope.get("type") or "default"


TOKENIZER_KINDS = ("byte-level BPE", "SentencePiece")
"""Vocabularies the writer turns into llama.cpp's (``gpt2`` and ``llama`` tokenizer models)."""


def tokenizer_kind(spec: dict) -> str:
    """What a tokenizer.json holds, in the words validation and errors use.

    A SentencePiece model (Llama 2, TinyLlama, Mistral) reaches transformers as a BPE with
    ``byte_fallback`` and a Metaspace (``▁``) pre-tokenizer or normalizer; a byte-level BPE
    (GPT-2, SmolLM2, Llama 3, Qwen2) maps bytes to printable characters instead.
    """
    model = spec.get("model") or {}
    kind = model.get("type")
    if kind == "BPE":
        return "SentencePiece" if model.get("byte_fallback") else "byte-level BPE"
    return {"Unigram": "SentencePiece Unigram", "WordPiece": "WordPiece", "WordLevel": "WordLevel"}.get(kind, str(kind))


# Pre-tokenizer regexes of tokenizer.json -> the name llama.cpp implements for them.
_LLAMA3_REGEX = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}"
_QWEN2_REGEX = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}|"


def pre_tokenizer_name(pre: dict | None) -> str:
    """llama.cpp's name for a tokenizer.json pre-tokenizer; UserError for one it has no name for here."""
    parts = (pre or {}).get("pretokenizers", [pre] if pre else [])
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm"
    regex = (parts[0].get("pattern") or {}).get("Regex", "") if kinds[:1] == ["Split"] else ""
    if regex.startswith(_LLAMA3_REGEX):
        return "llama-bpe"
    if regex.startswith(_QWEN2_REGEX):
        return "qwen2"
    raise UserError(
        f"export: tokenizer pre-tokenizer {kinds or 'none'} is not one our GGUF writer can name for llama.cpp "
        "(known: GPT-2 byte-level, SmolLM, Llama 3, Qwen2)"
    )


class CheckSpec(Strict):
    """Parity of an exported file against the HF model, on the same held-out token ids.

    Defaults come from measured floors: an f32/f16 export agrees almost exactly; llama.cpp on
    a quantised file computes with the quantised weights (SmolLM2 Q4_1 vs its dequantised
    HF model: ~0.94 top-1), so each quantised format is held to its own floor, measured in the
    same check on the untrained base (``quant_margin``).
    """

    prompts: int = Field(8, ge=1)
    """Held-out examples (``eval.split``) fed to both sides."""
    max_tokens: int = Field(64, ge=2)
    """Teacher-forced tokens per example (prompt + reference answer, truncated)."""
    new_tokens: int = Field(16, ge=1)
    """Greedy tokens generated per prompt on both sides."""
    top1: dict[str, float] = {"f32": 0.995, "f16": 0.995, "bf16": 0.98, "onnx": 0.999}
    """Minimum teacher-forced next-token top-1 agreement, per float format (``onnx``: the fp32 ONNX export).
    A quantised format listed here is held to this as well as to its floor (``quant_margin``)."""
    max_dlogit: dict[str, float | None] = {"f32": 0.05, "f16": 0.5, "bf16": 2.0, "onnx": 1e-3}
    """Largest allowed |logit difference| per format; a format not listed is not held to one."""
    greedy: dict[str, float] = {"f32": 0.9, "f16": 0.8, "bf16": 0.6, "onnx": 0.9}
    """Minimum greedy agreement (share of generated tokens before the first difference), per float format."""
    quant_margin: float = Field(0.10, ge=0, le=1)
    """A quantised file (q8_0, Q4_K_M, Q5_K_M, Q6_K) may agree this much less (top-1) than its floor: the
    same format made from the untrained base, against the HF base, on the same ids (check_export measures
    it). Why relative: 4-bit rounding costs a trained model a share of agreement that varies from run to run
    (SmolLM2 Q4_K_M: 0.849 and 0.875 for one recipe); the floor says where that share should be. Measured
    with the defaults (8 x 64 positions), SmolLM2 Q4_K_M, seeds 1-3: 0.014, 0.065 and 0.029 under the floor
    (0.05 failed seed 2); 0.10 is ~1.5x the widest gap and ~6 standard errors of a 512-position share, while
    a layout or tokenizer mistake costs far more (tests/test_export.py). Greedy agreement is
    reported next to the floor's, not held to a limit: one early difference ends a greedy run, so over 8
    prompts it is too noisy to judge a quantised file (the LoRA check holds top-1 alone too)."""
    lora_margin: float = Field(0.05, ge=0, le=1)
    """A LoRA GGUF on the base GGUF may agree this much less (top-1) than the base GGUF agrees
    with the HF base (the base file's own floor). SmolLM2, seeds 1-3: -0.002, 0.006 and 0.033 under it
    (0.02 failed seed 3), so 0.05."""


class GgufExportSpec(Spec):
    formats: list[GgufFormat] = ["f16"]
    """Full-model files to write: f32, f16, bf16 (our writer), q8_0, Q4_K_M, Q5_K_M, Q6_K (llama.cpp's quantizer)."""
    lora: bool = True
    """Also write the trained LoRA alone as a GGUF adapter, applicable on the base GGUF (if the run trained one)."""
    check: CheckSpec = CheckSpec()
    """Thresholds of the check_export stage."""


@EXPORTS.register("gguf", GgufExportSpec)
def gguf_export(spec: GgufExportSpec):
    """GGUF for llama.cpp: the merged model in each format, and the LoRA adapter alone."""
    return spec


def supported_message(arch: str) -> str:
    return f"architecture {arch} cannot be exported to GGUF yet; supported: {', '.join(SUPPORTED)}"


@dataclass(frozen=True)
class ExportProfile:
    """What decides whether the GGUF writer can write a model, read without loading it; None: not readable here."""

    architecture: str | None
    tokenizer: str | None
    """``tokenizer_kind`` of its tokenizer.json (``byte-level BPE``, ``SentencePiece`` ...)."""
    rope: str | None
    """``rope_type`` of its config.json."""
    pre_tokenizer: dict | None = None
    """A byte-level BPE's tokenizer.json pre-tokenizer (llama.cpp must have a name for it)."""


def export_profile(model_spec) -> ExportProfile:
    """The architecture, tokenizer kind and rope type of a model preset, from the files it will load.

    tiny is a Llama with a byte-level BPE; a packaged GGUF names its architecture and tokenizer model
    in its header; an HF dir (or a hub id already in the HF cache) has config.json and tokenizer.json.
    A hub id not downloaded yet reads as all None: nothing can be said before the download.
    """
    kind = getattr(model_spec, "kind", None)
    if kind == "tiny":
        return ExportProfile("LlamaForCausalLM", "byte-level BPE", "default")
    if kind == "gguf":
        path = _packaged(model_spec.package, model_spec.file)
        if path is None:
            return ExportProfile(None, None, None)  # the model group reports a missing package or file
        arch = gguf_header_string(path, "general.architecture")
        vocab = gguf_header_string(path, "tokenizer.ggml.model")
        tokenizer = {"gpt2": "byte-level BPE", "llama": "SentencePiece"}.get(vocab, vocab)
        return ExportProfile(_by_gguf_name(arch), tokenizer, None)
    if kind != "hf":
        return ExportProfile(None, None, None)
    config, tok = _hf_json(model_spec, "config.json"), _hf_json(model_spec, "tokenizer.json")
    arch = ((config or {}).get("architectures") or [None])[0]
    rope = None
    if config is not None:
        found = config.get("rope_parameters") or config.get("rope_scaling") or {}
        rope = found.get("rope_type") or found.get("type") or "default"
    tokenizer = tokenizer_kind(tok) if tok is not None else None
    return ExportProfile(arch, tokenizer, rope, tok.get("pre_tokenizer") if tok is not None else None)


def export_refusal(model_spec) -> str | None:
    """Why the GGUF writer cannot write this model preset, in one sentence that names the model, what
    it has and what is supported; None when it can, or when its files are not here to read."""
    from engine.model.names import display_name

    profile = export_profile(model_spec)
    name = display_name(model_spec)
    if profile.architecture is not None and profile.architecture not in SUPPORTED:
        return f"{name}: {supported_message(profile.architecture)}"
    if profile.tokenizer is not None and profile.tokenizer not in TOKENIZER_KINDS:
        return (
            f"{name} has a {profile.tokenizer} tokenizer, which our GGUF writer cannot write yet; "
            f"supported tokenizer kinds: {', '.join(TOKENIZER_KINDS)}"
        )
    if profile.rope is not None and profile.rope not in ROPE_TYPES:
        return (
            f"{name} uses rope scaling '{profile.rope}', which our GGUF writer cannot write yet; "
            f"supported rope types: {', '.join(ROPE_TYPES)}"
        )
    if profile.tokenizer == "byte-level BPE" and getattr(model_spec, "kind", None) == "hf":
        try:
            pre_tokenizer_name(profile.pre_tokenizer)
        except UserError as e:
            return f"{name}: {str(e).removeprefix('export: ')}"
    return None


def architecture_of(model_spec) -> str | None:
    """The HF architecture a model preset builds, read without loading weights; None if unknown here."""
    return export_profile(model_spec).architecture


def _hf_json(model_spec, name: str) -> dict | None:
    """A JSON file of an HF dir, or of a hub id in the HF cache (never downloaded here)."""
    import json
    from pathlib import Path

    local = Path(model_spec.name_or_path).expanduser()
    path = local / name
    if not path.is_file() and not local.is_dir():
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(model_spec.name_or_path, name, revision=model_spec.revision)
        path = Path(cached) if isinstance(cached, str) else None
    if path is None or not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError:
        return None  # a damaged file: the model group's loader says so


def _packaged(package: str, file: str):
    import importlib.util
    from pathlib import Path

    found = importlib.util.find_spec(package)
    path = Path(found.origin).parent / file if found and found.origin else None
    return path if path is not None and path.is_file() else None


def _by_gguf_name(arch: str | None) -> str | None:
    by_gguf = {}
    for hf, (name, _) in SUPPORTED.items():
        by_gguf.setdefault(name, hf)  # llama -> LlamaForCausalLM, the first listed
    return by_gguf.get(arch, arch) if arch else None


def gguf_header_string(path, key: str, *, max_keys: int = 64) -> str | None:
    """A string value from a GGUF file's first metadata entries, read directly.

    Why not ``gguf.GGUFReader``: it parses every tensor record first (~6 s for SmolLM2 here),
    too slow for validation; the keys wanted here come first in every writer's output.
    """
    import struct

    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}

    def skip(f, kind: int, count: int = 1) -> bool:
        if kind in sizes:
            f.seek(sizes[kind] * count, 1)
        elif kind == 8:
            for _ in range(count):
                f.seek(struct.unpack("<Q", f.read(8))[0], 1)
        else:
            return False  # nested arrays: stop rather than walk them
        return True

    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            return None
        _version, _tensors, n_kv = struct.unpack("<IQQ", f.read(20))
        for _ in range(min(n_kv, max_keys)):
            name = f.read(struct.unpack("<Q", f.read(8))[0]).decode()
            kind = struct.unpack("<I", f.read(4))[0]
            if kind == 8 and name == key:
                return f.read(struct.unpack("<Q", f.read(8))[0]).decode(errors="replace")
            if kind == 9:  # array: element type, count
                element, count = struct.unpack("<IQ", f.read(12))
                if not skip(f, element, count):
                    return None
            elif not skip(f, kind):
                return None
    return None
