"""Test fixtures: offline, tiny by construction (random-init model, tiny tokenizer)."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import logging.config
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

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


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``engine ARGS`` in this process (``engine.cli.main``): exit code, stdout and stderr.

    For command lines that are refused before anything runs (config, type and secret errors, a run
    dir that cannot be used): the same code path as the real command without the second or two a
    fresh interpreter spends importing. A few tests keep ``run_engine`` to prove the real command
    line (no traceback, the console script, a second process). What the command changes in this
    process is put back: cwd, environment, argv, the ``--config-dir`` folders, Hydra's job config,
    the root logger's handlers and level, Hydra's global state, run-dir locks and the settings read from ``.env``.
    """
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    from engine import lock, settings
    from engine.cli import main
    from engine.config.composition import UserConfigs

    root = logging.getLogger()
    saved = (os.getcwd(), dict(os.environ), list(sys.argv), root.handlers[:], root.level, HydraConfig.instance().cfg)
    held, hydra_was_set = set(lock._HELD), GlobalHydra.instance().is_initialized()
    out, err = io.StringIO(), io.StringIO()
    settings.settings.cache_clear()  # a fresh process reads the cwd's .env
    try:
        if cwd is not None:
            os.chdir(cwd)
        # Hydra's log set-up (logging.config.dictConfig) first closes every handler in the process.
        # A fresh process has none to close; this one has pytest's and absl's, and absl's closes
        # its stream (pytest's captured stderr) when sys.stderr is redirected. Leave them open.
        no_clearing = mock.patch.object(logging.config, "_clearExistingHandlers", lambda: None)
        with no_clearing, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(args))
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        os.chdir(saved[0])
        os.environ.clear()
        os.environ.update(saved[1])
        sys.argv[:] = saved[2]
        for handler in root.handlers[:]:
            if handler not in saved[3]:
                root.removeHandler(handler)
                handler.close()
        for handler in saved[3]:
            if handler not in root.handlers:
                root.addHandler(handler)
        root.setLevel(saved[4])
        HydraConfig.instance().cfg = saved[5]
        if not hydra_was_set:
            GlobalHydra.instance().clear()
        UserConfigs.dirs = []
        for run_dir in set(lock._HELD) - held:
            lock.release(run_dir)
        settings.settings.cache_clear()
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="session", autouse=True)
def session_cache(tmp_path_factory) -> Path:
    """$ENGINE_CACHE for the whole session: a fresh data cache, removed with the session's tmp dirs,
    so tests never fill the user's ~/.cache/engine/data; converted models and build checks stay
    shared with the user's cache (linked), as converting again would only cost time."""
    from engine.files import cache_root

    real = cache_root()
    root = tmp_path_factory.mktemp("engine_cache")
    for kept in ("models", "native"):
        (real / kept).mkdir(parents=True, exist_ok=True)
        (root / kept).symlink_to(real / kept, target_is_directory=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ENGINE_CACHE", str(root))
        yield root


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


def save_adapter(dest: Path, seed: int, **config) -> Path:
    """A random LoRA (A and B both non-zero, alpha/r = 8) on the tiny model, saved as PEFT saves it:
    the adapter file the serving, chat and QA-matrix tests load. ``config``: other ``LoraConfig``
    values (rank, targets, DoRA ...) in place of these."""
    import torch
    from peft import LoraConfig, get_peft_model

    from engine.model import TinySpec, build_tiny

    model, _ = build_tiny(TinySpec(kind="tiny"))
    config = {"r": 4, "lora_alpha": 32, "target_modules": ["q_proj", "v_proj", "o_proj", "down_proj"]} | config
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        peft = get_peft_model(model, LoraConfig(init_lora_weights=False, **config))
    peft.save_pretrained(dest)
    return dest
