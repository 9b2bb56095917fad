"""Serving check on the real model: the default recipe's LoRA on the shipped SmolLM2 Q4_1 GGUF.

What it measures, per held-out prompt (the eval split of env_science_qa, as the run made it):
greedy continuations (up to 32 tokens, stopping at end-of-generation) from four models --
  served base      the Q4_1 GGUF through engine's llamacpp backend, adapter set empty
  served adapter   the same backend, the run's LoRA (as a GGUF adapter) at scale 1.0
  HF base          transformers, the de-quantised fp32 copy of the same GGUF
  HF adapter       HF base + the run's PEFT adapter
and reports greedy agreement (share of tokens before the first difference, mean over prompts)
of served adapter vs HF adapter, of served base vs HF base (the floor: llama.cpp computes with the
4-bit weights, transformers with their fp32 de-quantisation), and the share of prompts whose
served adapter answer differs from the served base answer. Both sides get the same prompt ids.

The backend switches base -> adapter -> base ... per prompt, as a server does between requests,
so the numbers also cover the cache invalidation on a switch.

    python bench/serve_adapter_smollm2.py                      # newest outputs/lora_smollm2/<time>
    python bench/serve_adapter_smollm2.py --run-dir outputs/lora_smollm2/<time> --prompts 8

Needs a finished default-recipe run (``python -m engine recipe=lora_smollm2``, a few minutes on
2 cores). Writes bench/results/serve_adapter_smollm2.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

NEW_TOKENS = 32
ADAPTER = "lora_smollm2"


def newest_run() -> Path:
    runs = sorted(p.parent.parent for p in (ROOT / "outputs" / "lora_smollm2").glob("*/adapter/adapter_config.json"))
    if not runs:
        sys.exit("no finished lora_smollm2 run under outputs/; run `python -m engine recipe=lora_smollm2` first")
    return runs[-1]


def specs(run_dir: Path):
    """The run's own model, quantization and data specs (its config.yaml), the data file found in this checkout."""
    import yaml

    from engine.config import registries

    raw = yaml.safe_load((run_dir / "config.yaml").read_text())
    groups = registries()

    def spec(group: str, node: dict):
        return groups[group].get(node["kind"]).spec.model_validate(node)

    data = dict(raw["data"])
    if not Path(data["path"]).is_file():  # written on another checkout: the same sample file here
        data["path"] = str(ROOT / "engine" / "samples" / Path(data["path"]).name)
    return spec("model", raw["model"]), spec("quantization", raw["quantization"]), spec("data", data), raw


def held_out(data_spec, tokenizer, raw: dict, n: int) -> tuple[list[list[int]], list[list[dict]]]:
    """The first n examples of the run's eval split: prompt ids rendered with the training template up to
    the assistant turn (as check_export does), and the same prompts as messages."""
    from engine.data import prepare

    data = prepare(data_spec, tokenizer, seed=raw["seed"])
    examples = (data.splits.get(raw["eval"]["split"]) or data.splits["train"])[:n]
    ids = [tokenizer(data.prompt_text(ex, tokenizer), add_special_tokens=False).input_ids for ex in examples]
    return ids, [ex.prompt_messages for ex in examples]


def hf_greedy(model, prompt: list[int], eog: list[int]) -> list[int]:
    """Greedy tokens (KV cache), the end-of-generation token kept as the last one when reached."""
    import torch

    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            eos_token_id=eog,
            pad_token_id=eog[0],
        )
    return out[0, len(prompt) :].tolist()


def served(backend, prompt: list[int], adapters: tuple, eos: int) -> tuple[list[int], float]:
    """Greedy tokens through the backend (EOS appended when it finished on it) and the seconds taken."""
    from engine.serve.backend import AdapterScale, GenerateRequest

    sets = tuple(AdapterScale(name, scale) for name, scale in adapters)
    start = time.perf_counter()
    pieces = list(backend.generate(GenerateRequest(prompt_ids=prompt, max_tokens=NEW_TOKENS, temperature=0.0, adapters=sets)))
    seconds = time.perf_counter() - start
    ids = [t for p in pieces for t in p.token_ids]
    return ids + ([eos] if pieces[-1].finish_reason == "stop" else []), seconds


def agreement(a: list[int], b: list[int]) -> float:
    """Share of tokens before the first difference (over the longer answer)."""
    same = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        same += 1
    return same / max(len(a), len(b), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, default=None)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "serve_adapter_smollm2.json")
    args = parser.parse_args()

    import llama_cpp
    import numpy as np

    from engine.export.gguf import write_lora_gguf
    from engine.export.merge import find_trained, load_trained
    from engine.model import convert_gguf_once, gguf_path
    from engine.serve.backends.llamacpp import LlamaCppSpec, load_llamacpp

    run_dir = (args.run_dir or newest_run()).resolve()
    model_spec, quant_spec, data_spec, raw = specs(run_dir)
    trained = find_trained(run_dir)
    base_gguf = gguf_path(model_spec.package, model_spec.file)
    base_dir = convert_gguf_once(model_spec.package, model_spec.file)

    t0 = time.perf_counter()
    hf, tokenizer = load_trained(model_spec, quant_spec, trained)
    cases, messages = held_out(data_spec, tokenizer, raw, args.prompts)
    load_hf = time.perf_counter() - t0

    with tempfile.TemporaryDirectory() as tmp:
        lora = write_lora_gguf(trained, json.loads((base_dir / "config.json").read_text()), Path(tmp) / "adapter-lora.gguf")
        spec = LlamaCppSpec(kind="llamacpp", context_length=1024, threads=args.threads)
        t0 = time.perf_counter()
        backend = load_llamacpp(spec, gguf_path=base_gguf, adapter_paths={ADAPTER: lora})
        load_served = time.perf_counter() - t0
        try:
            vocab = backend._llm._model.vocab
            eog = [t for t in range(backend._llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, t)]
            eos = backend._llm.token_eos()
            template_same = [backend.render_chat(m) for m in messages]
            rows = []
            for i, prompt in enumerate(cases):
                s_base, sec_base = served(backend, prompt, (), eos)
                s_lora, sec_lora = served(backend, prompt, ((ADAPTER, 1.0),), eos)
                h_lora = hf_greedy(hf, prompt, eog)
                with hf.disable_adapter():
                    h_base = hf_greedy(hf, prompt, eog)
                rows.append(
                    {
                        "prompt_tokens": len(prompt),
                        "adapter_vs_hf_adapter": agreement(s_lora, h_lora),
                        "base_vs_hf_base": agreement(s_base, h_base),
                        "served_adapter_differs_from_base": s_lora != s_base,
                        "hf_adapter_differs_from_base": h_lora != h_base,
                        "served_tokens_per_s": (len(s_base) + len(s_lora)) / (sec_base + sec_lora),
                        "served_base": tokenizer.decode(s_base, skip_special_tokens=True),
                        "served_adapter": tokenizer.decode(s_lora, skip_special_tokens=True),
                        "hf_adapter": tokenizer.decode(h_lora, skip_special_tokens=True),
                    }
                )
                last = rows[-1]
                print(f"[{i + 1}/{len(cases)}] adapter {last['adapter_vs_hf_adapter']:.3f} base {last['base_vs_hf_base']:.3f}")
        finally:
            backend.close()

    summary = {
        "prompts": len(rows),
        "new_tokens": NEW_TOKENS,
        "greedy_adapter_vs_hf_adapter": round(float(np.mean([r["adapter_vs_hf_adapter"] for r in rows])), 4),
        "greedy_base_vs_hf_base_floor": round(float(np.mean([r["base_vs_hf_base"] for r in rows])), 4),
        "share_adapter_answer_differs_from_base": round(float(np.mean([r["served_adapter_differs_from_base"] for r in rows])), 4),
        "share_hf_adapter_differs_from_hf_base": round(float(np.mean([r["hf_adapter_differs_from_base"] for r in rows])), 4),
        "render_chat_ids_equal_training_prompt_ids": sum(a == b for a, b in zip(template_same, cases, strict=True)) / len(cases),
        "served_tokens_per_s_median": round(float(np.median([r["served_tokens_per_s"] for r in rows])), 1),
        "load_seconds": {"served_base_plus_adapter": round(load_served, 2), "hf_base_plus_adapter": round(load_hf, 2)},
    }
    record = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.processor() or platform.platform()}",
        "command": "python bench/serve_adapter_smollm2.py " + " ".join(sys.argv[1:]),
        "run_dir": run_dir.name,
        "base_gguf": base_gguf.name,
        "llama_cpp_python": llama_cpp.__version__,
        "summary": summary,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2, ensure_ascii=False))
    print(json.dumps(summary, indent=2))
    print("example:", json.dumps({k: rows[0][k] for k in ("served_base", "served_adapter", "hf_adapter")}, ensure_ascii=False))


if __name__ == "__main__":
    main()
