"""Export benchmark: time to write each format, file size, and generation speed of each file
next to the HF model it came from, on the same prompt ids.

    python bench/export_speed.py --merged outputs/export_smollm2/<time>/merged
    python bench/export_speed.py --merged <dir> --formats f16,Q4_K_M --prompts 2 --new 16   # quick

What a user picks between: the merged HF model in transformers (fp32 on CPU, with its KV
cache, ``generate``), the GGUF files in llama.cpp (llama-cpp-python, the same thread count),
and the ONNX file in onnxruntime (engine's exported KV-cache graph, greedy loop in Python).

Every arm decodes greedily exactly ``--new`` tokens per prompt (EOS not honoured, so every arm
does the same work) from the same prompt ids (the chat template applied by the merged model's
tokenizer to held-out questions of the shipped Q&A set). Reported per arm: prompt time
(time to the first token's logits) and decode tokens/s (the other new-1 tokens), medians over
the prompts; export seconds and file size per format. Arms run one after another, twice in
alternating order (A B ... / ... B A), and the better of the two is kept per arm, so a
neighbour's load on a shared machine does not decide the ranking.

Results: bench/results/export_speed_<stamp>.json; the table is printed for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FLOATS = ("f32", "f16", "bf16")


def prompt_ids(merged: Path, n: int) -> list[list[int]]:
    """Chat-templated ids of the last n questions of the shipped Q&A set (held-out end of the file)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(merged)
    rows = [json.loads(line) for line in (ROOT / "engine/samples/env_science_qa.jsonl").read_text().splitlines() if line]
    out = []
    for row in rows[-n:]:
        messages = [{"role": "user", "content": row["instruction"]}]
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        out.append(list(ids))
    return out


def export_all(merged: Path, out: Path, formats: list[str]) -> dict[str, dict]:
    """Write each format the way export_gguf does; quantised ones from one f32 file (timed apart)."""
    from engine.export.gguf import quantize, write_gguf

    template = (merged / "chat_template.jinja").read_text() if (merged / "chat_template.jinja").is_file() else ""
    files: dict[str, dict] = {}
    t = time.perf_counter()
    f32 = write_gguf(merged, out / "model-f32.gguf", "f32", chat_template=template)
    f32_s = time.perf_counter() - t
    for fmt in formats:
        t = time.perf_counter()
        if fmt == "f32":
            path, secs = f32, f32_s
        elif fmt in FLOATS:
            path = write_gguf(merged, out / f"model-{fmt}.gguf", fmt, chat_template=template)
            secs = time.perf_counter() - t
        else:
            path = quantize(f32, out / f"model-{fmt}.gguf", fmt)
            secs = f32_s + time.perf_counter() - t  # a user pays the f32 intermediate too
        files[fmt] = {"path": path, "export_s": round(secs, 2), "mb": round(path.stat().st_size / 1e6, 1)}
    return files


def _rates(times: list[tuple[float, float]], new: int) -> dict:
    """(prompt seconds, decode seconds) per prompt -> medians."""
    return {
        "prompt_s": round(statistics.median(p for p, _ in times), 4),
        "decode_tok_s": round(statistics.median((new - 1) / d for _, d in times), 1),
    }


def run_hf(merged: Path, prompts: list[list[int]], new: int, threads: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    times = []
    with torch.no_grad():
        for ids in prompts:
            x = torch.tensor([ids])
            t = time.perf_counter()
            out = model(x, use_cache=True)
            first = time.perf_counter() - t
            past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
            t = time.perf_counter()
            for _ in range(new - 1):
                out = model(tok, past_key_values=past, use_cache=True)
                past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
            times.append((first, time.perf_counter() - t))
    return _rates(times, new)


def run_gguf(path: Path, prompts: list[list[int]], new: int, threads: int) -> dict:
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(str(path), n_ctx=1024, n_threads=threads, n_threads_batch=threads, verbose=False)
    times = []
    try:
        for ids in prompts:
            llm.reset()
            t = time.perf_counter()
            llm.eval(ids)
            first = time.perf_counter() - t
            tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            t = time.perf_counter()
            for _ in range(new - 1):
                llm.eval([tok])
                tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            times.append((first, time.perf_counter() - t))
    finally:
        llm.close()
    return _rates(times, new)


def run_onnx(path: Path, prompts: list[list[int]], new: int, threads: int) -> dict:
    from engine.export.onnx import OnnxLM

    lm = OnnxLM(path, threads=threads)
    times = []
    for ids in prompts:
        t = time.perf_counter()
        logits, past = lm.step(list(ids), None, 0)
        first = time.perf_counter() - t
        tok, pos = int(logits[-1].argmax()), len(ids)
        t = time.perf_counter()
        for _ in range(new - 1):
            logits, past = lm.step([tok], past, pos)
            tok, pos = int(logits[-1].argmax()), pos + 1
        times.append((first, time.perf_counter() - t))
    return _rates(times, new)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--merged", type=Path, required=True, help="a merged HF model dir (run_dir/merged)")
    ap.add_argument("--formats", default="f32,f16,bf16,q8_0,Q6_K,Q5_K_M,Q4_K_M")
    ap.add_argument("--onnx", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    prompts = prompt_ids(args.merged, args.prompts)
    result: dict = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "args": {k: str(v) for k, v in vars(args).items()},
        "prompt_tokens": [len(p) for p in prompts],
    }
    with tempfile.TemporaryDirectory() as tmp:
        files = export_all(args.merged, Path(tmp), args.formats.split(","))
        arms = {"hf_fp32": lambda: run_hf(args.merged, prompts, args.new, args.threads)}
        arms |= {f"gguf_{fmt}": (lambda p=f["path"]: run_gguf(p, prompts, args.new, args.threads)) for fmt, f in files.items()}
        exports = {fmt: {k: v for k, v in f.items() if k != "path"} for fmt, f in files.items()}
        if args.onnx:
            from engine.export.onnx import write_onnx

            t = time.perf_counter()
            written = write_onnx(args.merged, Path(tmp) / "model.onnx")
            mb = round(sum(p.stat().st_size for p in written) / 1e6, 1)
            exports["onnx"] = {"export_s": round(time.perf_counter() - t, 2), "mb": mb}
            arms["onnx_fp32"] = lambda: run_onnx(written[0], prompts, args.new, args.threads)
        runs: dict[str, list[dict]] = {name: [] for name in arms}
        for order in (list(arms), list(arms)[::-1]):
            for name in order:
                runs[name].append(arms[name]())
                print(name, runs[name][-1], flush=True)
    best = {name: max(r, key=lambda x: x["decode_tok_s"]) for name, r in runs.items()}
    result |= {"exports": exports, "runs": runs, "best": best}
    out = ROOT / "bench/results" / f"export_speed_{time.strftime('%Y%m%d_%H%M')}.json"
    out.write_text(json.dumps(result, indent=2))
    hf = best["hf_fp32"]["decode_tok_s"]
    print("\n| arm | export s | size MB | prompt s (median) | decode tok/s | vs HF fp32 |\n|---|---|---|---|---|---|")
    for name, r in best.items():
        fmt = name.split("_", 1)[1] if name != "onnx_fp32" else "onnx"
        e = exports.get(fmt, {})
        ratio = f"{r['decode_tok_s'] / hf:.2f}x"
        cells = [name, e.get("export_s", "-"), e.get("mb", "-"), r["prompt_s"], r["decode_tok_s"], ratio]
        print("| " + " | ".join(map(str, cells)) + " |")
    print(f"\nwrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
