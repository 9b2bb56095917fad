"""GGUF export of the architectures beyond Llama: Qwen2 and Phi-2, checked against llama.cpp.

Each tiny model is made hard to match by accident: attention is peaked (as in test_export.py),
and every bias and norm vector is non-zero (random init leaves biases at 0 and norms at 1, so a
dropped or misplaced bias, or Phi's LayerNorm read as an RMSNorm, would change nothing). Then a
wrong rotary layout or rotary width moves the logits well past the f32 tolerance: measured here,
Qwen2 written with Llama's q/k permutation agrees 0.13 top-1, Phi rotating whole heads 0.82.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import CONF, build_tiny_arch, compose

from engine.errors import ConfigError, UserError

llama_cpp = pytest.importorskip("llama_cpp")

PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Name three greenhouse gases."}],
]
# HF class -> (GGUF architecture, the model preset whose lora_targets a LoRA uses).
ARCHS = {"phi": ("phi2", "phi2"), "qwen2": ("qwen2", "qwen2_5_0_5b")}


def hardened(model):
    """Peaked attention and non-zero biases and norms, in place; returns the model."""
    import torch

    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(12)
            elif name.endswith(("v_proj.weight", "o_proj.weight", "dense.weight")):
                p.mul_(10)
            elif p.ndim == 1:
                p.add_(0.5 * torch.randn(p.shape, generator=generator))
    return model


def saved(model, tokenizer, where: Path) -> Path:
    hardened(model).save_pretrained(where)
    tokenizer.save_pretrained(where)
    return where


def cases(tokenizer):
    from engine.data.templates import render
    from engine.export.check import Case

    out = []
    for messages in PROMPTS:
        prompt = tokenizer(render(tokenizer.chat_template, messages, add_generation_prompt=True), add_special_tokens=False)
        answer = tokenizer(" Paris, I think.", add_special_tokens=False).input_ids
        out.append(Case(forced=prompt.input_ids + answer, prompt=prompt.input_ids, messages=messages))
    return out


def hf_model(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).float().eval()


def measure(reference, tokenizer, gguf: Path, lora: Path | None = None):
    from engine.export.check import open_gguf, parity

    llm = open_gguf(gguf, n_ctx=256, lora=lora, threads=1)
    try:
        return parity(reference, llm, cases(tokenizer), new_tokens=8), dict(llm.metadata)
    finally:
        llm.close()


# --- the full model ----------------------------------------------------------------------------


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("arch", ["phi", "qwen2"])
def test_f32_gguf_logits_match_transformers(tmp_path, arch, tied):
    from engine.export.gguf import write_gguf

    model, tokenizer = build_tiny_arch(arch, tied=tied)
    base = saved(model, tokenizer, tmp_path / "base")
    out = write_gguf(base, tmp_path / "m.gguf", "f32", chat_template=tokenizer.chat_template)
    got, meta = measure(hf_model(base), tokenizer, out)
    assert got.top1 == 1.0 and got.greedy == 1.0, got
    assert got.max_dlogit < 1e-3, got  # measured ~1.5e-5 (Phi), ~1.5e-6 (Qwen2)
    gguf_arch = ARCHS[arch][0]
    assert meta["general.architecture"] == gguf_arch
    if arch == "phi":
        assert int(meta["phi2.rope.dimension_count"]) == 16 // 2  # head_dim x partial_rotary_factor
        assert float(meta["phi2.attention.layer_norm_epsilon"]) == pytest.approx(1e-5)
    else:
        assert int(meta["qwen2.rope.dimension_count"]) == 16
        assert float(meta["qwen2.attention.layer_norm_rms_epsilon"]) == pytest.approx(1e-6)


# --- the LoRA adapter alone --------------------------------------------------------------------


@pytest.mark.parametrize("fixture", ["tiny_phi", "tiny_qwen2"])
def test_lora_gguf_on_the_base_gguf_gives_the_merged_models_tokens(tmp_path, request, fixture):
    """PEFT LoRA on the preset's own lora_targets (Phi: q/k/v, dense, fc1, fc2): no row permutation
    (neox rotary), the same logits as HF+PEFT, and the merged file's greedy tokens."""
    from peft import LoraConfig, get_peft_model

    from engine.export.check import gguf_greedy, open_gguf
    from engine.export.gguf import write_gguf, write_lora_gguf
    from engine.export.merge import Trained, load_trained, merge_to_dir
    from engine.model import HfSpec
    from engine.quantization import NoQuantSpec

    model, tokenizer = request.getfixturevalue(fixture)
    arch = fixture.removeprefix("tiny_")
    targets = yaml.safe_load((Path(CONF) / "model" / f"{ARCHS[arch][1]}.yaml").read_text())["lora_targets"]
    base = saved(model, tokenizer, tmp_path / "base")
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    get_peft_model(hf_model(base), config).save_pretrained(tmp_path / "adapter")

    trained = Trained(adapter_dir=tmp_path / "adapter")
    spec, quant = HfSpec(kind="hf", name_or_path=str(base)), NoQuantSpec(kind="none")
    reference, tok = load_trained(spec, quant, trained)
    template = tokenizer.chat_template
    merged = merge_to_dir(load_trained(spec, quant, trained)[0], tok, tmp_path / "merged", chat_template=template)
    merged_gguf = write_gguf(merged, tmp_path / "merged.gguf", "f32", chat_template=template)
    base_gguf = write_gguf(base, tmp_path / "base.gguf", "f32", chat_template=template)
    lora = write_lora_gguf(trained, json.loads((base / "config.json").read_text()), tmp_path / "lora.gguf")

    got, _ = measure(reference, tokenizer, base_gguf, lora)
    assert got.top1 == 1.0 and got.greedy == 1.0 and got.max_dlogit < 1e-3, got
    without, _ = measure(reference, tokenizer, base_gguf)
    assert without.max_dlogit > 100 * got.max_dlogit  # the adapter is applied, not ignored
    tokens = {}
    for name, path, adapter in [("merged", merged_gguf, None), ("lora", base_gguf, lora)]:
        llm = open_gguf(path, n_ctx=256, lora=adapter, threads=1)
        try:
            tokens[name] = [gguf_greedy(llm, c.prompt, 12) for c in cases(tokenizer)]
        finally:
            llm.close()
    assert tokens["merged"] == tokens["lora"]


# --- vocabulary: the pre-tokenizer name llama.cpp reads ----------------------------------------

# Qwen2/2.5's tokenizer.json pre-tokenizer: digits one by one, unlike GPT-2's runs of digits.
QWEN2_PRE = {
    "type": "Sequence",
    "pretokenizers": [
        {
            "type": "Split",
            "pattern": {
                "Regex": "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
                "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
            },
            "behavior": "Isolated",
            "invert": False,
        },
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
    ],
}


@pytest.mark.parametrize(("arch", "pre"), [("qwen2", "qwen2"), ("phi", "gpt-2")])
def test_llama_cpp_tokenizes_like_the_hf_tokenizer(tmp_path, arch, pre):
    """The pre-tokenizer name written decides how llama.cpp splits text: Qwen2's (tiny tokenizer
    given Qwen2's pre-tokenizer) splits digits one by one, GPT-2's (Phi-2's) keeps runs of them."""
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    from engine.export.gguf import write_gguf

    model, tokenizer = build_tiny_arch(arch)
    base = saved(model, tokenizer, tmp_path / "base")
    if arch == "qwen2":
        spec = json.loads((base / "tokenizer.json").read_text())
        spec["pre_tokenizer"] = QWEN2_PRE
        (base / "tokenizer.json").write_text(json.dumps(spec))
        tokenizer = AutoTokenizer.from_pretrained(base)
    out = write_gguf(base, tmp_path / "m.gguf", "f32", chat_template=tokenizer.chat_template)
    text = "<|im_start|>user\nIn 2024, 12345 people   paid $3.50 each.\n\nDon't they?<|im_end|>\n"
    llm = Llama(str(out), n_ctx=64, n_threads=1, verbose=False)
    try:
        assert llm.metadata["tokenizer.ggml.pre"] == pre
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == tokenizer(text, add_special_tokens=False).input_ids
    finally:
        llm.close()


# --- refusals ----------------------------------------------------------------------------------


def _config_only(where: Path, arch: str, model_type: str) -> Path:
    where.mkdir(parents=True, exist_ok=True)
    (where / "config.json").write_text(json.dumps({"architectures": [arch], "model_type": model_type}))
    return where


@pytest.mark.parametrize(("arch", "model_type"), [("PhiForCausalLM", "phi"), ("Qwen2ForCausalLM", "qwen2")])
def test_phi_and_qwen2_pass_validation_with_export_gguf(tmp_path, arch, model_type):
    where = _config_only(tmp_path, arch, model_type)
    compose(["model=phi2", f"model.name_or_path={where}", "stages=[prepare_data,train,merge,export_gguf]"])


def test_unsupported_architecture_is_refused_at_validation_with_the_list(tmp_path):
    """GPT-NeoX's HF dir (config.json only: nothing loads before validation): exit 2, every supported one named."""
    from engine.export import SUPPORTED

    where = _config_only(tmp_path, "GPTNeoXForCausalLM", "gpt_neox")
    with pytest.raises(ConfigError) as err:
        compose(["model=phi2", f"model.name_or_path={where}", "stages=[prepare_data,train,merge,export_gguf]"])
    assert err.value.exit_code == 2
    assert "GPTNeoXForCausalLM cannot be exported to GGUF" in str(err.value)
    for arch in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "PhiForCausalLM"):
        assert arch in SUPPORTED and arch in str(err.value)


def test_the_writer_refuses_an_unsupported_model_dir_too(tmp_path):
    """A dir that skipped validation (a finished run exported by hand) gets the same list, no traceback."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from engine.export.gguf import write_gguf

    model, tokenizer = build_tiny_arch("qwen2")
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2)).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(UserError, match="GPT2LMHeadModel cannot be exported to GGUF yet; supported: .*PhiForCausalLM"):
        write_gguf(tmp_path, tmp_path / "m.gguf", "f32", chat_template=tokenizer.chat_template)
