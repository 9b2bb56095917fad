"""Test fixtures: offline, tiny by construction (random-init model, tiny tokenizer)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
CONF = str(ROOT / "engine" / "conf")
ASSETS = ROOT / "tests" / "assets"
TINY_TOKENIZER = ROOT / "engine" / "assets" / "tiny_tokenizer"
TINY = ["model=tiny"]
# A few fast CPU training steps on the tiny model: small batches, no warm-up, a high lr so
# parameters visibly move, fp32 so results do not depend on the machine's bf16 support.
HAVE_BNB = importlib.util.find_spec("bitsandbytes") is not None
needs_bnb = pytest.mark.skipif(not HAVE_BNB, reason="bitsandbytes is not installed (pip install -e '.[quant]')")
"""For tests of 4/8-bit bases: bitsandbytes is the optional ``quant`` extra (CI installs it)."""

QUICK_TRAIN = [
    *TINY,
    "train.micro_batch_size=2",
    "train.grad_accum=1",
    "train.warmup_steps=0",
    "train.lr=1e-2",
    "device=cpu",
    "precision=fp32",
]


def compose(overrides: list[str], check: bool = True):
    """Compose conf/ through the front door (as the CLI does) and validate."""
    from engine.config import load

    return load([*overrides], str(CONF), check=check)


def run_engine(*args: str, cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """``python -m engine ARGS`` in a subprocess: exit code, stdout and stderr as a user sees them."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, "-m", "engine", *args],
        cwd=cwd or ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return tmp_path / "run"


# --- tiny models of the other exported architectures (Phi-2, Qwen2) -------------------------


def build_tiny_arch(arch: str, *, tied: bool = False):
    """A random-init tiny Phi or Qwen2 (hidden 64, 2 layers, 4 heads) on the tiny tokenizer.

    Same shape as the tiny Llama, so exports of all three are measured alike; Phi rotates half
    of each head (``partial_rotary_factor`` 0.5, as Phi-2's 0.4 rotates part), Qwen2 has 2 KV
    heads (grouped-query attention, as Qwen2.5). Returns (model, tokenizer).
    """
    import torch
    from transformers import AutoTokenizer, PhiConfig, PhiForCausalLM, Qwen2Config, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(TINY_TOKENIZER)
    shape = {
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": tied,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
    }
    if arch == "phi":
        model_class, config = PhiForCausalLM, PhiConfig(**shape, partial_rotary_factor=0.5)
    elif arch == "qwen2":
        model_class, config = Qwen2ForCausalLM, Qwen2Config(**shape, num_key_value_heads=2)
    else:
        raise ValueError(f"no tiny model for {arch}; phi or qwen2")
    # Same weights for the same seed, whatever ran before (as build_tiny does).
    with torch.random.fork_rng():
        torch.manual_seed(1234)
        return model_class(config).float().eval(), tokenizer


@pytest.fixture
def tiny_phi():
    return build_tiny_arch("phi")


@pytest.fixture
def tiny_qwen2():
    return build_tiny_arch("qwen2")


def save_adapter(dest: Path, seed: int) -> Path:
    """A random LoRA (A and B both non-zero, alpha/r = 8) on the tiny model, saved as PEFT saves it:
    the adapter file the serving, chat and QA-matrix tests load."""
    import torch
    from peft import LoraConfig, get_peft_model

    from engine.model import TinySpec, build_tiny

    model, _ = build_tiny(TinySpec(kind="tiny"))
    targets = ["q_proj", "v_proj", "o_proj", "down_proj"]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=32, target_modules=targets, init_lora_weights=False))
    peft.save_pretrained(dest)
    return dest
