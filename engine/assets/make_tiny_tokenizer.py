"""Build engine/assets/tiny_tokenizer: a ~1k-vocab byte-level BPE for fast tests.

The tokenizer is trained on the text in engine/samples (Q&A, chat, numeric
rows and the plain-text documents). Special tokens mirror SmolLM2:
``<|endoftext|>`` (id 0, used as pad), ``<|im_start|>`` (id 1) and
``<|im_end|>`` (id 2, used as eos). There is no bos and no unk token; being
byte-level, every string encodes and decodes back exactly. A standard ChatML
chat template is attached.

Run from anywhere:  python engine/assets/make_tiny_tokenizer.py
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "engine" / "samples"
OUT_DIR = Path(__file__).resolve().parent / "tiny_tokenizer"

VOCAB_SIZE = 1024
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"
MODEL_MAX_LENGTH = 2048

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def corpus_lines() -> list[str]:
    lines: list[str] = []
    for name in ("env_science_qa.jsonl", "env_science_chat.jsonl", "env_numeric.jsonl"):
        with (SAMPLES / name).open(encoding="utf-8") as fh:
            for raw in fh:
                row = json.loads(raw)
                if "messages" in row:
                    lines.extend(m["content"] for m in row["messages"])
                else:
                    lines.extend(str(v) for v in row.values() if v)
    for path in sorted((SAMPLES / "documents").iterdir()):
        if path.suffix in {".txt", ".md"} and "ocr_failure" not in path.name:
            lines.extend(p for p in path.read_text(encoding="utf-8").splitlines() if p.strip())
    return lines


def build() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus_lines(), trainer=trainer)
    return tok


def main() -> None:
    from transformers import PreTrainedTokenizerFast

    tok = build()
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        bos_token=None,
        unk_token=None,
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        model_max_length=MODEL_MAX_LENGTH,
        clean_up_tokenization_spaces=False,
    )
    hf.chat_template = CHAT_TEMPLATE
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(OUT_DIR))
    print(f"saved tokenizer with vocab size {len(hf)} to {OUT_DIR}")


if __name__ == "__main__":
    main()
