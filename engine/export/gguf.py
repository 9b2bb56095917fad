"""HF model dir -> GGUF for llama.cpp, and a PEFT LoRA -> GGUF adapter. Our own writer.

Why our own: the ``gguf`` package has the file format (GGUFWriter, tensor name maps) but no
HF converter, and llama.cpp's convert script is not installable. The conventions that make a
file chat correctly are llama.cpp's:

- for the llama architecture, q/k projection rows are permuted from HF's rotate-half layout to
  llama.cpp's interleaved rotary layout (per head for q, per KV head for k) -- the same for a
  LoRA's B of q/k; Qwen2 and Phi-2 rotate halves in llama.cpp too (neox rotary), nothing moves;
- Phi-2 is LayerNorm with bias, a parallel attention/MLP block, and rotary on only the first
  ``partial_rotary_factor`` share of each head: its hparams say so (``rope.dimension_count``,
  the layernorm eps key) and its biases travel with their weights;
- a byte-level BPE vocab is ``tokenizer.ggml.model=gpt2`` with tokens, token types (control
  for special added tokens), merges and the pre-tokenizer name llama.cpp implements;
- chat template, BOS/EOS/PAD ids and context length go into the metadata, so llama.cpp and
  tools built on it chat with no extra flags.

Float formats are written here; q8_0 and the k-quants come from llama.cpp's own quantizer
(``llama_model_quantize``) run on our f32 file, not a re-implementation.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from engine.errors import UserError
from engine.export import ROPE_TYPES, SUPPORTED, TOKENIZER_KINDS, pre_tokenizer_name, supported_message, tokenizer_kind
from engine.export.merge import Trained, adapter_config
from engine.native import check_llama_cpp

FLOAT_FORMATS = ("f32", "f16", "bf16")
QUANTIZED = {"q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "Q5_K_M": "LLAMA_FTYPE_MOSTLY_Q5_K_M"}
QUANTIZED["Q6_K"] = "LLAMA_FTYPE_MOSTLY_Q6_K"


# --- the full model ----------------------------------------------------------------------


def export_formats(model_dir: Path, out_dir: Path, formats: list[str], *, stem: str, chat_template: str, pre: str | None = None):
    """Write ``<stem>-<format>.gguf`` for each format; returns {format: path}.

    Quantised formats are made from an f32 file (the one asked for, or a temporary one).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    for fmt in [f for f in formats if f in FLOAT_FORMATS]:
        written[fmt] = write_gguf(model_dir, out_dir / f"{stem}-{fmt}.gguf", fmt, chat_template=chat_template, pre=pre)
    quantized = [f for f in formats if f in QUANTIZED]
    if quantized:
        tmp = out_dir / f".{stem}-f32.tmp.gguf"
        source = written.get("f32") or write_gguf(model_dir, tmp, "f32", chat_template=chat_template, pre=pre)
        for fmt in quantized:
            written[fmt] = quantize(source, out_dir / f"{stem}-{fmt}.gguf", fmt)
        if "f32" not in written:
            source.unlink()
    return written


def write_gguf(
    model_dir: Path, out: Path, fmt: str, *, chat_template: str, pre: str | None = None, _permute_qk: bool = True
) -> Path:
    """One HF model dir (safetensors + tokenizer) -> one GGUF file in a float format.

    ``pre``: llama.cpp's pre-tokenizer name, when known from the source (a packaged GGUF);
    otherwise it is read off tokenizer.json. ``_permute_qk`` exists for tests only: a file
    written without the rotary permutation loads and runs, and talks nonsense.
    """
    import gguf

    config = json.loads((model_dir / "config.json").read_text())
    arch_name, permutes = _architecture(config)
    arch = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[arch_name]
    writer = gguf.GGUFWriter(out, arch_name)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(model_dir.name)
    _write_hparams(writer, config, arch_name)
    _write_vocab(writer, model_dir, config, chat_template=chat_template, pre=pre)
    names = gguf.TensorNameMap(arch, config["num_hidden_layers"])
    heads, kv_heads = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    written, embedding = set(), None
    for name, data in _hf_tensors(model_dir):
        target = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise UserError(f"export: tensor {name} of {model_dir} has no GGUF name for architecture {arch_name}")
        if permutes and _permute_qk and (".q_proj." in name or ".k_proj." in name):
            data = permute_rows(data, heads if ".q_proj." in name else kv_heads)
        _add_tensor(writer, gguf, target, data, fmt)
        written.add(target)
        embedding = data if target == "token_embd.weight" else embedding
    factors = llama3_rope_factors(config)
    if factors is not None:
        writer.add_tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", factors)
    if arch_name == "phi2" and "output.weight" not in written and embedding is not None:
        # llama.cpp's phi2 requires an output matrix; a tied model saved none (its lm_head is the embedding).
        _add_tensor(writer, gguf, "output.weight", embedding, fmt)
    file_types = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16}
    writer.add_file_type(file_types[fmt])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _finish(writer)
    return out


def permute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF rotate-half -> llama.cpp interleaved rotary order of rows, per head (q: attention heads, k: KV heads)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _architecture(config: dict) -> tuple[str, bool]:
    arch = (config.get("architectures") or ["?"])[0]
    if arch not in SUPPORTED:
        raise UserError(f"export: {supported_message(arch)}")
    return SUPPORTED[arch]


def _write_hparams(writer, config: dict, arch_name: str) -> None:
    """The shape, rotary and norm settings llama.cpp reads for ``arch_name`` (llama, qwen2, phi2).

    Qwen2's sliding-window fields are not written: llama.cpp's qwen2 attends over the whole
    context, as the released Qwen2/2.5 models do (``use_sliding_window: false``).
    """
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    rope = config.get("rope_parameters") or {}
    # Phi rotates only the first share of each head; transformers 5 keeps the factor in
    # rope_parameters, older config.json files (microsoft/phi-2's own) at the top level.
    partial = float(rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0)))
    writer.add_context_length(config.get("max_position_embeddings", 2048))
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads") or heads)
    writer.add_rope_dimension_count(int(head_dim * partial))
    if head_dim != config["hidden_size"] // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_rope_freq_base(float(rope.get("rope_theta", config.get("rope_theta", 10000.0))))
    if arch_name == "phi2":
        if config.get("qk_layernorm"):
            raise UserError("export: a Phi model with qk_layernorm has norms llama.cpp's phi2 does not hold; Phi-2 has none")
        writer.add_layer_norm_eps(float(config.get("layer_norm_eps", 1e-5)))
    else:
        writer.add_layer_norm_rms_eps(config.get("rms_norm_eps", 1e-6))
    writer.add_vocab_size(config["vocab_size"])
    _write_rope_scaling(writer, rope or config.get("rope_scaling") or {})


def _write_rope_scaling(writer, rope: dict) -> None:
    kind = rope.get("rope_type") or rope.get("type") or "default"
    if kind in ("default", "llama3"):  # llama3: no metadata, a rope_freqs tensor (``llama3_rope_factors``)
        return
    if kind == "linear":
        import gguf

        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
        return
    raise UserError(f"export: rope scaling '{kind}' is not written by our GGUF exporter yet (supported: {', '.join(ROPE_TYPES)})")


def llama3_rope_factors(config: dict) -> np.ndarray | None:
    """Llama 3.1's rope scaling as llama.cpp holds it: one divisor per rotary frequency, the tensor
    ``rope_freqs.weight`` (llama.cpp reads no rope-scaling metadata for it). None for other rope types.

    The divisor follows Meta's rule, which transformers applies to its inverse frequencies: wavelengths
    shorter than ``original_max_position_embeddings / high_freq_factor`` keep their frequency, longer
    than ``... / low_freq_factor`` are divided by ``factor``, those between are blended smoothly.
    """
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if (rope.get("rope_type") or rope.get("type")) != "llama3":
        return None
    heads = config["num_attention_heads"]
    dim = config.get("head_dim") or config["hidden_size"] // heads
    base = float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))
    factor, low, high = float(rope["factor"]), float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    original = float(rope.get("original_max_position_embeddings", 8192))
    freqs = 1.0 / base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    wavelen = 2 * math.pi / freqs
    smooth = (original / wavelen - low) / (high - low)
    blended = 1.0 / ((1 - smooth) / factor + smooth)
    divisors = np.where(wavelen < original / high, 1.0, np.where(wavelen > original / low, factor, blended))
    return divisors.astype(np.float32)


# --- vocabulary --------------------------------------------------------------------------


def _write_vocab(writer, model_dir: Path, config: dict, *, chat_template: str, pre: str | None) -> None:
    """The vocabulary (byte-level BPE or SentencePiece), special ids, whether BOS/EOS are added, the chat template."""
    import gguf
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    spec = json.loads((model_dir / "tokenizer.json").read_text()) if (model_dir / "tokenizer.json").is_file() else {}
    kind = tokenizer_kind(spec)
    if kind not in TOKENIZER_KINDS:
        raise UserError(
            f"export: the tokenizer of {model_dir} is a {kind} vocabulary; our GGUF writer supports "
            f"{' and '.join(TOKENIZER_KINDS)} vocabularies (SmolLM2, Llama, Qwen2, Phi-2, TinyLlama, Mistral)"
        )
    if kind == "SentencePiece":
        _write_sentencepiece_tokens(writer, gguf, tokenizer, spec, config["vocab_size"])
    else:
        _write_bpe_tokens(writer, gguf, tokenizer, spec, config["vocab_size"], pre)
    special = gguf.SpecialVocab(model_dir, load_merges=kind != "SentencePiece", n_vocab=config["vocab_size"])
    special.chat_template = None  # ours, below: the training template, not whatever the tokenizer carried
    special.add_special_token = {}
    special.add_to_gguf(writer, quiet=True)
    probe = tokenizer("a").input_ids
    writer.add_add_bos_token(tokenizer.bos_token_id is not None and probe[:1] == [tokenizer.bos_token_id])
    writer.add_add_eos_token(tokenizer.eos_token_id is not None and probe[-1:] == [tokenizer.eos_token_id])
    if "pad" not in special.special_token_ids and tokenizer.pad_token_id is not None:
        writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_chat_template(chat_template)


def _write_bpe_tokens(writer, gguf, tokenizer, spec: dict, vocab_size: int, pre: str | None) -> None:
    """Byte-level BPE: ``gpt2`` model, tokens, types (control for special added tokens); merges come
    with ``SpecialVocab``; the pre-tokenizer name llama.cpp implements."""
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(token)
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre or pre_tokenizer_name(spec.get("pre_tokenizer")))
    writer.add_token_list(tokens)
    writer.add_token_types(types)


def _write_sentencepiece_tokens(writer, gguf, tokenizer, spec: dict, vocab_size: int) -> None:
    """SentencePiece as llama.cpp's ``llama`` tokenizer model: pieces, scores, token types.

    llama.cpp's SentencePiece tokenizer merges, at each step, the adjacent pair whose joined text
    has the highest *score*; the HF tokenizer applies the *merge* of lowest rank. A piece's score is
    therefore minus the rank of the first merge that makes it (SentencePiece's own scores are in the
    same order: its BPE pieces are numbered as they were learned). Pieces no merge makes (single
    characters) and the ``<0xNN>`` byte-fallback pieces are starting symbols, whose scores never decide.
    Types: ``<unk>`` unknown, special added tokens control, other added tokens user-defined, ``<0xNN>``
    byte. ``add_space_prefix`` follows the Metaspace ``prepend_scheme``.
    """
    import re

    model = spec["model"]
    merges = [m.split(" ", 1) if isinstance(m, str) else m for m in model.get("merges", [])]
    made: dict[str, int] = {}
    for rank, (left, right) in enumerate(merges):
        made.setdefault(left + right, rank)
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    unk = model.get("unk_token") or tokenizer.unk_token
    tokens, scores, types = [], [], []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            scores.append(-1000.0)
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(token)
        if token == unk:
            scores.append(0.0)
            types.append(gguf.TokenType.UNKNOWN)
        elif i in added:
            scores.append(0.0)
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        elif re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", token):
            scores.append(0.0)
            types.append(gguf.TokenType.BYTE)
        else:
            scores.append(-float(made.get(token, len(merges) + i)))
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_add_space_prefix(_metaspace_prepends(spec))


def _metaspace_prepends(spec: dict) -> bool:
    """``add_space_prefix`` for llama.cpp: put ``▁`` before each text run (at the start and after every
    special token), as transformers does with a Metaspace ``prepend_scheme: always`` (``legacy: true``
    tokenizers) or an older ``Prepend`` normalizer.

    With ``prepend_scheme: first`` (``legacy: false``: TinyLlama) transformers adds ``▁`` only at the
    very start of the text, never after a special token; llama.cpp cannot do exactly that, and False
    is the closer of its two choices: text after special tokens, i.e. every chat turn, then gets the
    same ids, and only a text that starts without a special token or a space differs (its first
    ``▁``). What differs either way (see docs/export.md): a text run that starts with a space, which
    llama.cpp prefixes with a second ``▁`` and transformers does not. Engine itself never lets
    llama.cpp tokenize: check_export and the llama.cpp backend feed the HF tokenizer's ids.
    """
    found = []

    def walk(node):
        if isinstance(node, dict):
            if node.get("type") == "Metaspace":
                found.append(node.get("prepend_scheme", "always" if node.get("add_prefix_space", True) else "never") == "always")
            elif node.get("type") == "Prepend":
                found.append(True)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk({"pre_tokenizer": spec.get("pre_tokenizer"), "normalizer": spec.get("normalizer")})
    return any(found)


# --- tensors -----------------------------------------------------------------------------


def _hf_tensors(model_dir: Path):
    """(name, float32 array) for every weight in the dir's safetensors files, sorted by name."""
    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise UserError(f"export: {model_dir} has no *.safetensors weights; write it with the merge stage")
    for path in files:
        with safe_open(path, framework="pt") as f:
            for name in sorted(f.keys()):
                if name.endswith("rotary_emb.inv_freq"):
                    continue
                yield name, f.get_tensor(name).float().numpy()


def _add_tensor(writer, gguf, name: str, data: np.ndarray, fmt: str) -> None:
    """Matrices in the file's format; vectors (norms, biases) stay f32 as llama.cpp expects."""
    if data.ndim < 2 or fmt == "f32":
        writer.add_tensor(name, data.astype(np.float32))
    elif fmt == "f16":
        writer.add_tensor(name, data.astype(np.float16))
    else:
        bf16 = gguf.GGMLQuantizationType.BF16
        writer.add_tensor(name, gguf.quants.quantize(data.astype(np.float32), bf16), raw_dtype=bf16)


def _finish(writer) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def quantize(source: Path, out: Path, fmt: str, *, threads: int = 0) -> Path:
    """llama.cpp's own quantizer (``llama_model_quantize``) on a float GGUF file."""
    check_llama_cpp()
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANTIZED[fmt])
    params.nthread = threads
    code = llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), ctypes.byref(params))
    if code != 0 or not out.is_file():
        raise UserError(f"export: llama.cpp could not quantize {source.name} to {fmt} (code {code})")
    return out


# --- the LoRA adapter alone --------------------------------------------------------------


def write_lora_gguf(trained: Trained, base_config: dict, out: Path, *, _permute_qk: bool = True) -> Path:
    """A PEFT LoRA (or the stacked levels of a layered one) -> a llama.cpp GGUF adapter.

    llama.cpp applies ``scale * alpha / rank * B @ A`` per tensor. One plain LoRA keeps its A, B
    and alpha; rsLoRA and stacked levels fold their scale into B and write alpha = rank, so the
    file computes exactly what PEFT computed (levels stack as a LoRA of the summed rank).
    """
    import gguf

    arch_name, permutes = _architecture(base_config)
    arch = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[arch_name]
    names = gguf.TensorNameMap(arch, base_config["num_hidden_layers"])
    heads = base_config["num_attention_heads"]
    kv_heads = base_config.get("num_key_value_heads") or heads
    pairs = _lora_pairs(trained)
    plain = len(pairs) == 1 and not pairs[0][1].get("use_rslora")
    writer = gguf.GGUFWriter(out, arch_name)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    rank = sum(cfg["r"] for _, cfg, _ in pairs)
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(pairs[0][1]["lora_alpha"] if plain else rank))
    for module in sorted(pairs[0][0]):
        target = names.get_name(module)
        if target is None:
            raise UserError(f"export: LoRA on {module} has no GGUF tensor for architecture {arch_name}")
        a = np.concatenate([tensors[module][0] for tensors, _, _ in pairs], axis=0)
        b = np.concatenate([tensors[module][1] * (1.0 if plain else factor) for tensors, _, factor in pairs], axis=1)
        if permutes and _permute_qk and module.endswith((".q_proj", ".k_proj")):
            b = permute_rows(b, heads if module.endswith(".q_proj") else kv_heads)
        writer.add_tensor(f"{target}.weight.lora_a", a.astype(np.float32))
        writer.add_tensor(f"{target}.weight.lora_b", b.astype(np.float32))
    _finish(writer)
    return out


def _lora_pairs(trained: Trained) -> list[tuple[dict, dict, float]]:
    """Per adapter (level): {module: (A, B)}, its adapter_config, and its effective scale."""
    levels = trained.levels or [None]
    scales = trained.scales or [1.0]
    out = []
    for level, scale in zip(levels, scales, strict=True):
        cfg = adapter_config(trained, level)
        if cfg.get("use_dora"):
            raise UserError(
                "export: a DoRA adapter has a trained magnitude per output that llama.cpp's LoRA adapters cannot hold; "
                "ship the merged model (export.formats) and set export.lora=false"
            )
        if cfg.get("modules_to_save"):
            raise UserError(f"export: modules_to_save {cfg['modules_to_save']} are full weights, not LoRA; set export.lora=false")
        where = trained.adapter_dir / (f"level_{level}" if level is not None else "")
        r, alpha = cfg["r"], cfg["lora_alpha"]
        factor = scale * (alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r)
        out.append((_read_lora(where / "adapter_model.safetensors"), cfg, factor))
    return out


def _read_lora(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{``model.layers.0.self_attn.q_proj``: (A, B)} from a PEFT adapter_model.safetensors."""
    from safetensors import safe_open

    found: dict[str, dict[str, np.ndarray]] = {}
    with safe_open(path, framework="pt") as f:
        for key in f.keys():
            stem, _, kind = key.removeprefix("base_model.model.").rpartition(".lora_")
            if kind in ("A.weight", "B.weight"):
                found.setdefault(stem, {})[kind[0]] = f.get_tensor(key).float().numpy()
    return {module: (ab["A"], ab["B"]) for module, ab in found.items()}
