"""Every shipped model preset either exports to GGUF or is refused at validation: nothing in between.

For each preset a tiny random model of the same shape (architecture, tokenizer kind, rope type,
grouped-query attention) is built offline with a real tokenizer of that kind: SentencePiece
vocabularies are trained here by the ``sentencepiece`` package on the shipped sample text, with
byte fallback and control tokens as Llama 2 / TinyLlama / Mistral have them. Each passes
validation with ``export_gguf`` in its stages, and its f32 GGUF then agrees with transformers:
top-1 1.0, identical greedy tokens, and llama.cpp's tokenizer gives the HF tokenizer's ids on a
text with runs of spaces, digits, unicode and special tokens. A shape the writer cannot write
(yarn rope, a Unigram vocabulary) is refused at validation with exit status 2, also through
``eval.run_dir``.

The real models' shapes (config.json / tokenizer.json of each hub id, as published): SmolLM2 and
Llama 3 are Llama with byte-level BPE (``smollm`` / ``llama-bpe`` pre-tokenizers), TinyLlama is
Llama with a SentencePiece vocabulary (``legacy: false``), Mistral v0.3 is MistralForCausalLM with a
SentencePiece vocabulary and control tokens ([INST] ...), Qwen2.5 is Qwen2 with its own
byte-level BPE, Phi-2 is Phi with GPT-2's; none of the shipped presets scales its rope (Llama 3.1's
``llama3`` scaling is tested here too).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from conftest import CONF, TINY_TOKENIZER, build_tiny_arch, compose

from engine.errors import ConfigError

pytest.importorskip("llama_cpp")
spm = pytest.importorskip("sentencepiece")

PRESETS = sorted(p.stem for p in (Path(CONF) / "model").glob("*.yaml"))

CHATML_TEXT = "<|im_start|>user\nIn 2024, 12345 people   paid $3.50 each. Café ☃ 東京 🌍\n\nDon't they?<|im_end|>\n"
INST_TEXT = (
    "[INST] In 2024, 12345 people   paid $3.50 each.\n\nDon't they? café ☃ 東京 🌍 [/INST] Dirt.</s>[INST] And\ncarbon? [/INST]"
)
ZEPHYR_TEXT = "<s><|user|>\nIn 2024, 12345 people   paid $3.50 each. Café ☃ 東京 🌍</s>\n<|assistant|>\nWetlands.</s>"

# preset -> (HF architecture, tokenizer, rope): the real model's shape, in tiny.
SHAPES = {
    "tiny": ("llama", "tiny", "default"),
    "smollm2_135m": ("llama", "tiny", "default"),  # the tiny tokenizer is SmolLM2's kind: byte-level BPE
    "llama3_8b": ("llama", "llama3_bpe", "default"),  # Meta-Llama-3-8B: rope_theta 500000, no scaling
    "tinyllama_1b": ("llama", "sp_first", "default"),
    "mistral_7b": ("mistral", "sp_inst", "default"),
    "qwen2_5_0_5b": ("qwen2", "tiny", "default"),
    "phi2": ("phi", "tiny", "default"),
}
TEXTS = {"tiny": CHATML_TEXT, "llama3_bpe": CHATML_TEXT, "sp_first": ZEPHYR_TEXT, "sp_inst": INST_TEXT, "sp_always": None}

LLAMA3_PRE = {
    "type": "Sequence",
    "pretokenizers": [
        {
            "type": "Split",
            "pattern": {
                "Regex": "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
                "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
            },
            "behavior": "Isolated",
            "invert": False,
        },
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
    ],
}
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,  # Llama 3.1's 8192, scaled to the tiny head: all three regimes occur
}


# --- tokenizers of each kind -------------------------------------------------------------------


def _sample_text() -> list[str]:
    texts = []
    for path in sorted((Path(CONF).parent / "samples").glob("*.jsonl")):
        for line in path.read_text().splitlines():
            texts += [v for v in json.loads(line).values() if isinstance(v, str) and v.strip()]
    return texts


def sentencepiece_tokenizer(where: Path, *, legacy: bool, control: tuple[str, ...] = ()):
    """A SentencePiece BPE with byte fallback (as Llama 2's), trained on the shipped samples and loaded by
    transformers as LlamaTokenizer does a hub model's tokenizer.model; ``legacy`` as in tokenizer_config."""
    from transformers import AutoTokenizer

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_sample_text()), model_writer=model, vocab_size=700, model_type="bpe",
        byte_fallback=True, character_coverage=0.9995, split_digits=True, unk_id=0, bos_id=1, eos_id=2,
        pad_id=-1, control_symbols=list(control), minloglevel=2, num_threads=1,
    )  # fmt: skip
    where.mkdir(parents=True, exist_ok=True)
    (where / "tokenizer.model").write_bytes(model.getvalue())
    config = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (where / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": True, "legacy": legacy}))
    tokenizer = AutoTokenizer.from_pretrained(where)
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tokenizer_of(kind: str, where: Path):
    from transformers import AutoTokenizer

    if kind == "sp_first":
        return sentencepiece_tokenizer(where, legacy=False)
    if kind == "sp_inst":
        return sentencepiece_tokenizer(where, legacy=False, control=("[INST]", "[/INST]"))
    if kind == "sp_always":
        return sentencepiece_tokenizer(where, legacy=True)
    if kind == "llama3_bpe":
        where.mkdir(parents=True, exist_ok=True)
        AutoTokenizer.from_pretrained(TINY_TOKENIZER).save_pretrained(where)
        spec = json.loads((where / "tokenizer.json").read_text())
        spec["pre_tokenizer"] = LLAMA3_PRE
        (where / "tokenizer.json").write_text(json.dumps(spec))
        return AutoTokenizer.from_pretrained(where)
    return AutoTokenizer.from_pretrained(TINY_TOKENIZER)


# --- tiny models of each shape -----------------------------------------------------------------


def sharp(model):
    """Peaked attention and non-zero norms (test_export_arch.hardened): rotary or rope-scaling mistakes show."""
    from test_export_arch import hardened

    return hardened(model)


def tiny_model(arch: str, tokenizer, rope: str):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    if arch in ("phi", "qwen2"):
        model, tiny_tok = build_tiny_arch(arch)
        assert len(tiny_tok) == len(tokenizer)
        return sharp(model)
    shape = dict(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )  # fmt: skip
    if rope == "llama3":
        shape["rope_parameters"] = LLAMA3_ROPE
    config = MistralConfig(**shape, sliding_window=None) if arch == "mistral" else LlamaConfig(**shape)
    with torch.random.fork_rng():
        torch.manual_seed(1234)
        model = (MistralForCausalLM if arch == "mistral" else LlamaForCausalLM)(config).float().eval()
    return sharp(model)


def saved_shape(where: Path, arch: str, tok_kind: str, rope: str) -> tuple[Path, object]:
    tokenizer = tokenizer_of(tok_kind, where / "tokenizer")
    model = tiny_model(arch, tokenizer, rope)
    model.save_pretrained(where / "model")
    tokenizer.save_pretrained(where / "model")
    return where / "model", tokenizer


def agreement(model_dir: Path, tokenizer, text: str | None, *, reference_dir: Path | None = None):
    """The f32 GGUF of ``model_dir`` vs transformers (on ``reference_dir``, default the same): parity on two
    prompts, and llama.cpp's ids for ``text``."""
    from transformers import AutoModelForCausalLM

    from engine.export.check import Case, open_gguf, parity
    from engine.export.gguf import write_gguf

    out = write_gguf(model_dir, model_dir.parent / "m-f32.gguf", "f32", chat_template="")
    reference = AutoModelForCausalLM.from_pretrained(reference_dir or model_dir).float().eval()
    prompts = ["Wetlands store carbon in peat", "In 2024, 12345 soil samples were taken"]
    cases = []
    for prompt in prompts:
        ids = tokenizer(prompt).input_ids
        answer = tokenizer(" because of rain.", add_special_tokens=False).input_ids
        cases.append(Case(forced=ids + answer, prompt=ids, messages=[]))
    llm = open_gguf(out, n_ctx=256, threads=1)
    try:
        got = parity(reference, llm, cases, new_tokens=8)
        ids = None if text is None else llm.tokenize(text.encode(), add_bos=False, special=True)
        meta = dict(llm.metadata)
    finally:
        llm.close()
    return got, ids, meta


def _validates(preset: str, model_dir: Path) -> None:
    """Validation with export_gguf in the stages: the preset pointed at the tiny dir (an hf preset), or as shipped."""
    import yaml

    kind = yaml.safe_load((Path(CONF) / "model" / f"{preset}.yaml").read_text())["kind"]
    where = [f"model.name_or_path={model_dir}"] if kind == "hf" else []
    compose([f"model={preset}", *where, "stages=[prepare_data,train,merge,export_gguf,check_export]"])


# --- every shipped preset ----------------------------------------------------------------------


def test_every_shipped_model_preset_has_a_shape_here():
    assert sorted(SHAPES) == PRESETS, "a new model preset needs its shape in SHAPES (and docs/export.md)"


@pytest.mark.parametrize("preset", PRESETS)
def test_every_shipped_preset_validates_and_its_tiny_shape_exports_exactly(tmp_path, preset):
    arch, tok_kind, rope = SHAPES[preset]
    model_dir, tokenizer = saved_shape(tmp_path, arch, tok_kind, rope)
    _validates(preset, model_dir)  # not refused: so it must export, exactly
    got, ids, meta = agreement(model_dir, tokenizer, TEXTS[tok_kind])
    assert got.top1 == 1.0 and got.greedy == 1.0 and got.max_dlogit < 1e-3, got
    assert ids == tokenizer(TEXTS[tok_kind], add_special_tokens=False).input_ids
    if tok_kind.startswith("sp_"):
        assert meta["tokenizer.ggml.model"] == "llama"
        assert meta["tokenizer.ggml.add_bos_token"] == "true"


def test_sentencepiece_vocab_metadata_as_llama_cpp_reads_it(tmp_path):
    """Scores, token types, byte fallback and the special ids of a SentencePiece vocabulary."""
    import gguf

    from engine.export.gguf import write_gguf

    model_dir, tokenizer = saved_shape(tmp_path, "mistral", "sp_inst", "default")
    out = write_gguf(model_dir, tmp_path / "v.gguf", "f32", chat_template="")
    reader = gguf.GGUFReader(out)
    field = reader.fields
    types = [int(field["tokenizer.ggml.token_type"].parts[i][0]) for i in field["tokenizer.ggml.token_type"].data]
    tokens = [bytes(field["tokenizer.ggml.tokens"].parts[i]).decode() for i in field["tokenizer.ggml.tokens"].data]
    assert tokens[:3] == ["<unk>", "<s>", "</s>"]
    assert types[0] == gguf.TokenType.UNKNOWN and types[1] == types[2] == gguf.TokenType.CONTROL
    assert types[tokens.index("[INST]")] == gguf.TokenType.CONTROL
    byte = [t for t, k in zip(tokens, types, strict=True) if k == gguf.TokenType.BYTE]
    assert byte == [f"<0x{b:02X}>" for b in range(256)]  # every byte has its fallback piece
    for key, want in (("bos", 1), ("eos", 2), ("unknown", 0)):
        assert int(field[f"tokenizer.ggml.{key}_token_id"].parts[-1][0]) == want
    scores = [float(field["tokenizer.ggml.scores"].parts[i][0]) for i in field["tokenizer.ggml.scores"].data]
    merged = [s for s, t in zip(scores, types, strict=True) if t == gguf.TokenType.NORMAL]
    assert len(set(merged)) > 400  # merge ranks, not one placeholder score


def test_sentencepiece_legacy_tokenizer_and_where_llama_cpp_differs(tmp_path):
    """``legacy: true`` (Metaspace prepend_scheme always): the ids agree on text whose runs start with no
    space. Where llama.cpp's SentencePiece tokenizer differs from transformers is pinned here, so a
    change on either side shows: a run that starts with a space gets a second ``▁`` in llama.cpp."""
    model_dir, tokenizer = saved_shape(tmp_path, "llama", "sp_always", "default")
    text = "<s>In 2024, 12345 people   paid $3.50 each.\n\nCafé ☃ 東京 🌍</s>Yes."
    got, ids, meta = agreement(model_dir, tokenizer, text)
    assert got.top1 == 1.0 and got.greedy == 1.0, got
    assert meta["tokenizer.ggml.add_space_prefix"] == "true"
    assert ids == tokenizer(text, add_special_tokens=False).input_ids
    from llama_cpp import Llama

    llm = Llama(str(model_dir.parent / "m-f32.gguf"), n_ctx=64, n_threads=1, verbose=False, vocab_only=True)
    try:
        hf = tokenizer("</s> y", add_special_tokens=False).input_ids
        assert llm.tokenize(b"</s> y", add_bos=False, special=True) == [hf[0], tokenizer.convert_tokens_to_ids("▁"), *hf[1:]]
    finally:
        llm.close()


def test_llama3_rope_scaling_is_written_as_llama_cpp_reads_it(tmp_path):
    """Llama 3.1's rope scaling: the rope_freqs tensor. Written without it, the same weights disagree."""
    model_dir, tokenizer = saved_shape(tmp_path, "llama", "llama3_bpe", "llama3")
    got, ids, meta = agreement(model_dir, tokenizer, CHATML_TEXT)
    assert got.top1 == 1.0 and got.greedy == 1.0 and got.max_dlogit < 1e-3, got
    assert meta["tokenizer.ggml.pre"] == "llama-bpe" and ids == tokenizer(CHATML_TEXT, add_special_tokens=False).input_ids
    import shutil

    unscaled_dir = shutil.copytree(model_dir, tmp_path / "unscaled" / "model")
    config = json.loads((unscaled_dir / "config.json").read_text())
    assert config["rope_parameters"]["rope_type"] == "llama3"
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": LLAMA3_ROPE["rope_theta"]}
    (unscaled_dir / "config.json").write_text(json.dumps(config))
    unscaled, _, _ = agreement(unscaled_dir, tokenizer, None, reference_dir=model_dir)
    assert unscaled.max_dlogit > 100 * max(got.max_dlogit, 1e-5), (unscaled, got)
    _validates("llama3_8b", model_dir)


# --- refused at validation ---------------------------------------------------------------------


def _config_dir(where: Path, *, rope: dict | None = None, tokenizer: dict | None = None) -> Path:
    where.mkdir(parents=True, exist_ok=True)
    config = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"}
    if rope:
        config["rope_scaling"] = rope
    (where / "config.json").write_text(json.dumps(config))
    if tokenizer:
        (where / "tokenizer.json").write_text(json.dumps(tokenizer))
    return where


@pytest.mark.parametrize(
    ("files", "says"),
    [
        ({"rope": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}}, "rope scaling 'yarn'"),
        ({"tokenizer": {"model": {"type": "Unigram", "vocab": []}}}, "SentencePiece Unigram tokenizer"),
    ],
    ids=["yarn", "unigram"],
)
def test_what_the_writer_cannot_write_is_refused_before_training(tmp_path, files, says):
    where = _config_dir(tmp_path / "qwen", **files)
    with pytest.raises(ConfigError) as err:
        compose(["model=qwen2_5_0_5b", f"model.name_or_path={where}", "stages=[prepare_data,train,merge,export_gguf]"])
    assert err.value.exit_code == 2
    message = str(err.value)
    assert says in message and "qwen" in message and "drop export_gguf" in message
    assert "supported rope types: default, linear, llama3" in message or "byte-level BPE, SentencePiece" in message


def test_eval_run_dir_of_a_model_the_writer_cannot_write_is_refused(tmp_path):
    """A finished run whose model has yarn rope: exporting it is refused at validation too."""
    from engine.config import record

    where = _config_dir(tmp_path / "qwen", rope={"type": "yarn", "factor": 4.0})
    cfg = compose(["model=qwen2_5_0_5b", f"model.name_or_path={where}"])  # training alone is fine
    run = tmp_path / "run"
    record.freeze(cfg, run)
    (run / "adapter").mkdir()
    (run / "adapter" / "adapter_config.json").write_text("{}")
    with pytest.raises(ConfigError) as err:
        compose([f"eval.run_dir={run}", "stages=[prepare_data,merge,export_gguf]"])
    assert err.value.exit_code == 2 and "rope scaling 'yarn'" in str(err.value)
