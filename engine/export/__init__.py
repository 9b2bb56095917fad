"""The ``export`` group: what leaves Python after training, and how closely it must agree.

Kinds:
  gguf  the merged model as GGUF files for llama.cpp (f32, f16, bf16, and q8_0 / Q4_K_M /
        Q5_K_M / Q6_K through llama.cpp's own quantizer), plus the LoRA adapter alone as a
        GGUF adapter that llama.cpp applies on the base GGUF without merging. Architectures:
        the Llama family (SmolLM2, TinyLlama, Llama 3, Mistral), Qwen2 and Phi-2 (``SUPPORTED``);
        any other is refused at validation with that list.

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

from typing import Literal

from pydantic import Field

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


class CheckSpec(Strict):
    """Parity of an exported file against the HF model, on the same held-out token ids.

    Defaults come from measured floors: an f32/f16 export agrees almost exactly; llama.cpp on
    a quantised file computes with the quantised weights (SmolLM2 Q4_1 vs its dequantised
    HF model: ~0.94 top-1), so each quantised format is held to its own, lower floor.
    """

    prompts: int = Field(8, ge=1)
    """Held-out examples (``eval.split``) fed to both sides."""
    max_tokens: int = Field(64, ge=2)
    """Teacher-forced tokens per example (prompt + reference answer, truncated)."""
    new_tokens: int = Field(16, ge=1)
    """Greedy tokens generated per prompt on both sides."""
    top1: dict[str, float] = {
        "f32": 0.995,
        "f16": 0.995,
        "bf16": 0.98,
        "q8_0": 0.97,
        "Q6_K": 0.93,
        "Q5_K_M": 0.9,
        "Q4_K_M": 0.85,
        "onnx": 0.999,
    }
    """Minimum teacher-forced next-token top-1 agreement, per format (``onnx``: the fp32 ONNX export)."""
    max_dlogit: dict[str, float | None] = {"f32": 0.05, "f16": 0.5, "bf16": 2.0, "onnx": 1e-3}
    """Largest allowed |logit difference| per format; a format not listed is not held to one."""
    greedy: dict[str, float] = {
        "f32": 0.9, "f16": 0.8, "bf16": 0.6, "q8_0": 0.6, "Q6_K": 0.4, "Q5_K_M": 0.3, "Q4_K_M": 0.25, "onnx": 0.9,
    }  # fmt: skip
    """Minimum greedy agreement (share of generated tokens before the first difference), per format."""
    lora_margin: float = Field(0.02, ge=0, le=1)
    """A LoRA GGUF on the base GGUF may agree this much less (top-1) than the base GGUF agrees
    with the HF base (the base file's own floor)."""


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


def architecture_of(model_spec) -> str | None:
    """The HF architecture a model preset builds, read without loading weights; None if unknown here.

    tiny is a Llama; a packaged GGUF names its own; an HF dir (or a cached hub id) has a config.json.
    """
    import json
    from pathlib import Path

    kind = getattr(model_spec, "kind", None)
    if kind == "tiny":
        return "LlamaForCausalLM"
    if kind == "gguf":
        return _gguf_architecture(model_spec.package, model_spec.file)
    if kind == "hf":
        config = Path(model_spec.name_or_path).expanduser() / "config.json"
        if not config.is_file():
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(model_spec.name_or_path, "config.json", revision=model_spec.revision)
            config = Path(cached) if isinstance(cached, str) else None
        if config is not None and config.is_file():
            archs = json.loads(config.read_text()).get("architectures") or [None]
            return archs[0]
    return None


def _gguf_architecture(package: str, file: str) -> str | None:
    import importlib.util
    from pathlib import Path

    found = importlib.util.find_spec(package)
    path = Path(found.origin).parent / file if found and found.origin else None
    if path is None or not path.is_file():
        return None  # the model group reports a missing package or file
    arch = gguf_header_string(path, "general.architecture")
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
