"""Export: merge, GGUF (full and LoRA-only) and check_export, on the tiny Llama, offline.

The tiny model's random init has near-uniform attention, so a wrong q/k rotary layout hardly
changes its logits. ``sharp`` scales its attention weights until attention is peaked, as in a
trained model: then a missing permutation changes the next-token ranking, and a test can tell.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import QUICK_TRAIN, compose, run_engine

from engine.errors import ConfigError

llama_cpp = pytest.importorskip("llama_cpp")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Name three greenhouse gases."}],
]


def sharp(model):
    """Peaked attention (q, k x12; v, o x10): rotary layout mistakes now show in the logits."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(12)
            elif name.endswith(("v_proj.weight", "o_proj.weight")):
                p.mul_(10)
    return model


def tiny_base(tmp: Path):
    """A sharpened tiny Llama saved as an HF dir; returns (dir, tokenizer)."""
    from engine.model import TinySpec, build_tiny

    model, tokenizer = build_tiny(TinySpec(kind="tiny"))
    sharp(model).save_pretrained(tmp / "base")
    tokenizer.save_pretrained(tmp / "base")
    return tmp / "base", tokenizer


def cases(tokenizer):
    from engine.data.templates import render
    from engine.export.check import Case

    out = []
    for messages in PROMPTS:
        text = render(tokenizer.chat_template, messages, add_generation_prompt=True)
        prompt = tokenizer(text, add_special_tokens=False).input_ids
        answer = tokenizer(" Paris, I think.", add_special_tokens=False).input_ids
        out.append(Case(forced=prompt + answer, prompt=prompt, messages=messages))
    return out


def hf_model(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).float().eval()


def measure(reference, gguf: Path, lora: Path | None = None):
    from engine.export.check import open_gguf, parity

    llm = open_gguf(gguf, n_ctx=256, lora=lora, threads=1)
    try:
        return parity(reference, llm, cases(tiny_tokenizer()), new_tokens=8)
    finally:
        llm.close()


def tiny_tokenizer():
    from transformers import AutoTokenizer

    from engine.model import TINY_TOKENIZER

    return AutoTokenizer.from_pretrained(TINY_TOKENIZER)


def test_gguf_f32_logits_match_transformers(tmp_path):
    from engine.export.check import failures
    from engine.export.gguf import write_gguf

    base, tokenizer = tiny_base(tmp_path)
    out = write_gguf(base, tmp_path / "m.gguf", "f32", chat_template=tokenizer.chat_template)
    got = measure(hf_model(base), out)
    assert got.top1 == 1.0 and got.greedy == 1.0
    assert got.max_dlogit < 1e-3, got
    assert failures("m.gguf", got, top1=0.995, max_dlogit=0.05, greedy=0.9) == []


def test_skipped_qk_permutation_is_caught_by_the_check(tmp_path):
    """The private switch writes a file that loads and runs, and is wrong: the default thresholds say so."""
    from engine.export import GgufExportSpec
    from engine.export.check import failures
    from engine.export.gguf import write_gguf

    base, tokenizer = tiny_base(tmp_path)
    broken = write_gguf(base, tmp_path / "broken.gguf", "f32", chat_template=tokenizer.chat_template, _permute_qk=False)
    got = measure(hf_model(base), broken)
    check = GgufExportSpec(kind="gguf").check
    limits = {"top1": check.top1["f32"], "max_dlogit": check.max_dlogit["f32"], "greedy": check.greedy["f32"]}
    problems = failures("broken.gguf", got, **limits)
    assert any("top-1 agreement" in p for p in problems), (got, problems)
    assert any("max |dlogit|" in p for p in problems)


def _lora_run(tmp: Path, levels: list[str]):
    """A base dir and a random (non-zero) LoRA per level, saved as PEFT writes them."""
    from peft import LoraConfig, get_peft_model

    base, tokenizer = tiny_base(tmp)
    model = hf_model(base)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
    model = get_peft_model(model, config, adapter_name=levels[0])
    for name in levels[1:]:
        model.add_adapter(name, config)
    model.save_pretrained(tmp / "adapter")
    return base, tokenizer


def test_lora_gguf_on_the_base_gguf_gives_the_merged_models_tokens(tmp_path):
    from engine.export.check import gguf_greedy, open_gguf
    from engine.export.gguf import write_gguf, write_lora_gguf
    from engine.export.merge import Trained, load_trained, merge_to_dir
    from engine.model import HfSpec
    from engine.quantization import NoQuantSpec

    base, tokenizer = _lora_run(tmp_path, ["default"])
    trained = Trained(adapter_dir=tmp_path / "adapter")
    spec, quant = HfSpec(kind="hf", name_or_path=str(base)), NoQuantSpec(kind="none")
    reference, tok = load_trained(spec, quant, trained)
    template = tokenizer.chat_template
    merged = merge_to_dir(load_trained(spec, quant, trained)[0], tok, tmp_path / "merged", chat_template=template)
    assert hf_model(merged).config.architectures == ["LlamaForCausalLM"]  # a plain HF dir, no PEFT
    merged_gguf = write_gguf(merged, tmp_path / "merged.gguf", "f32", chat_template=template)
    base_gguf = write_gguf(base, tmp_path / "base.gguf", "f32", chat_template=template)
    lora = write_lora_gguf(trained, json.loads((base / "config.json").read_text()), tmp_path / "lora.gguf")

    got = measure(reference, base_gguf, lora)
    assert got.top1 == 1.0 and got.max_dlogit < 1e-3, got
    tokens = {}
    for name, path, adapter in [("merged", merged_gguf, None), ("lora", base_gguf, lora)]:
        llm = open_gguf(path, n_ctx=256, lora=adapter, threads=1)
        tokens[name] = [gguf_greedy(llm, c.prompt, 12) for c in cases(tokenizer)]
        llm.close()
    assert tokens["merged"] == tokens["lora"]

    plain = write_lora_gguf(trained, json.loads((base / "config.json").read_text()), tmp_path / "np.gguf", _permute_qk=False)
    assert measure(reference, base_gguf, plain).max_dlogit > 100 * got.max_dlogit  # B of q/k needs the permutation too


def test_stacked_layered_levels_export_as_one_lora_with_their_scales(tmp_path):
    from engine.adapter import load_stacked
    from engine.export.gguf import write_gguf, write_lora_gguf
    from engine.export.merge import Trained

    base, tokenizer = _lora_run(tmp_path, ["level_1", "level_2"])
    trained = Trained(adapter_dir=tmp_path / "adapter", levels=[1, 2], scales=[1.0, 0.5])
    reference = load_stacked(hf_model(base), trained.adapter_dir, [1, 2], [1.0, 0.5])
    base_gguf = write_gguf(base, tmp_path / "base.gguf", "f32", chat_template=tokenizer.chat_template)
    lora = write_lora_gguf(trained, json.loads((base / "config.json").read_text()), tmp_path / "lora.gguf")
    got = measure(reference, base_gguf, lora)
    assert got.top1 == 1.0 and got.max_dlogit < 1e-3, got


# --- validation -------------------------------------------------------------------------------


def test_unsupported_architecture_is_refused_at_validation(tmp_path):
    """Phi-2's HF dir (config.json only: nothing loads before validation) with export_gguf: exit 2, the list."""
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["PhiForCausalLM"], "model_type": "phi"}))
    with pytest.raises(ConfigError) as err:
        compose(["model=phi2", f"model.name_or_path={tmp_path}", "stages=[prepare_data,train,merge,export_gguf]"])
    assert err.value.exit_code == 2
    assert "PhiForCausalLM cannot be exported to GGUF" in str(err.value) and "LlamaForCausalLM" in str(err.value)


@pytest.mark.parametrize(
    ("stages", "says"),
    [
        ("[merge,export_gguf]", "no stage of this run trains and eval.run_dir is not set"),
        ("[prepare_data,train,check_export,export_gguf]", "put export_gguf before it"),
        ("[prepare_data,export_gguf,train]", "put the export stages after training"),
    ],
)
def test_export_stage_order_is_checked(stages, says):
    with pytest.raises(ConfigError, match=says):
        compose([*QUICK_TRAIN, f"stages={stages}"])


def test_dora_lora_export_is_refused():
    with pytest.raises(ConfigError, match="export.lora=false"):
        compose([*QUICK_TRAIN, "adapter=dora", "stages=[prepare_data,train,export_gguf]"])


# --- end to end: train, then export the finished run without retraining -------------------------


@pytest.mark.slow
def test_finished_run_exports_checks_and_chats(tmp_path):
    trained = tmp_path / "trained"
    proc = run_engine(*QUICK_TRAIN, "train.max_steps=1", "stages=[prepare_data,train]", f"hydra.run.dir={trained}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "export"
    proc = run_engine(
        *QUICK_TRAIN,
        f"eval.run_dir={trained}",
        "stages=[merge,export_gguf,check_export]",
        "export.formats=[f32,q8_0]",
        "export.check.prompts=2",
        "export.check.new_tokens=4",
        f"hydra.run.dir={run}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["merge"]["from"] == str((trained / "adapter").resolve())
    manifest = json.loads((run / "export" / "manifest.json").read_text())["files"]
    assert set(manifest) == {"model-f32.gguf", "model-q8_0.gguf", "adapter-lora.gguf"}
    assert (run / "export" / "base-f32.gguf").is_file()
    for name, entry in manifest.items():
        assert entry["bytes"] == (run / "export" / name).stat().st_size and "top1" in entry["parity"]
    check = metrics["check_export"]
    assert check["passed"] and check["files"]["model-f32.gguf"]["top1"] == 1.0
    assert check["files"]["model-f32.gguf"]["chat_template"] == {"embedded": True, "same_ids": True}
    assert hf_model(run / "merged").config.architectures == ["LlamaForCausalLM"]
    _chats_with_its_embedded_template(run)


def _chats_with_its_embedded_template(run: Path):
    """create_chat_completion, no chat_format given: the prompt it builds is the training template's ids,
    and its greedy answer is the one llama.cpp gives for exactly those ids."""
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    from engine.data.templates import render
    from engine.export.check import gguf_greedy

    tokenizer = AutoTokenizer.from_pretrained(run / "merged")
    messages = PROMPTS[0]
    ids = tokenizer(render(tokenizer.chat_template, messages, add_generation_prompt=True), add_special_tokens=False).input_ids
    llm = Llama(str(run / "export" / "model-f32.gguf"), n_ctx=256, n_threads=1, logits_all=True, verbose=False)
    try:
        # Greedy and no repeat penalty (the chat API's default is 1.1): the same rule as gguf_greedy.
        reply = llm.create_chat_completion(messages=messages, max_tokens=6, temperature=0.0, repeat_penalty=1.0)
        expected = gguf_greedy(llm, ids, 6)
        stop = expected.index(tokenizer.eos_token_id) if tokenizer.eos_token_id in expected else len(expected)
        text = llm.detokenize(expected[:stop]).decode(errors="ignore")  # as the chat API renders tokens
    finally:
        llm.close()
    assert reply["usage"]["prompt_tokens"] == len(ids)
    assert reply["choices"][0]["message"]["content"] == text
