"""Data at scale (issue 30): prepare a million rows once, reuse them, stream what does not fit.

    python bench/data_scale.py                                  # 1,000,000 rows, every case
    python bench/data_scale.py --rows 20000 --cases prepare,baseline,baseline_encoder,second
    python bench/data_scale.py --cases stream --stream-gb 0.5 5

Cases (each a fresh process, as a user runs it; files under --work, default /tmp/engine_data_scale):

- ``prepare``: ``engine data=auto data.path=rows.jsonl 'stages=[prepare_data]'`` on an empty
  data cache: wall time, engine's own "prepared N rows in X s" line, peak RSS (the largest
  process, from /usr/bin/time -v, and the sum over the process tree, sampled with psutil).
- ``baseline``: the plain ``datasets`` pipeline a user writes for the same examples, in the same
  run: ``load_dataset("json")`` + ``Dataset.map(batched=True, num_proc=cores)`` whose function
  renders each conversation and its prompt with ``tokenizer.apply_chat_template``, tokenizes the
  batch with the fast tokenizer (offsets on, truncation at max_length) and labels the tokens that
  start after the prompt and before the turn's trailing newline. Its ids and labels equal engine's
  (checked on the first 2,000 rows before timing). Nothing else: no normalisation, dedupe, split
  or reports. rows/s of the load + map.
- ``baseline_encoder``: the same ``datasets`` pipeline, its map calling engine's own renderer and
  tokenizer (``engine.data.tokens.encode_many``) instead: what engine's per-row extras cost
  (reading and checking every row, normalisation, dedupe and split digests, the stored messages).
- ``second``: the same command with ``stages=[prepare_data,train] train.max_steps=1`` on the warm
  cache: seconds from the command to the training loop's start (its first step begins) and to the
  end of that step, and whether anything was prepared.
- ``train_rss``: peak RSS of ``train.max_steps=2`` on 1,000 rows vs on --rows rows (both cached).
- ``stream``: ``data.streaming=true train.max_steps=3`` on JSONL files of each --stream-gb size:
  peak RSS (independent of the file's size).

Rows are generated here (``generate``): Alpaca-shaped, ~60 words per answer, seeded. The
model is the default recipe's (SmolLM2-135M, its tokenizer and chat template). The data cache is
``--work/cache`` (``$ENGINE_CACHE``), its ``models`` linked to ~/.cache/engine/models so the
model is not converted again. Run on a quiet machine: record ``uptime`` with the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORDS = (
    "water soil carbon peat marsh river delta forest climate species habitat nitrogen rain drought "
    "wetland estuary sediment flood plain root leaf canopy insect bird fish algae bloom oxygen "
    "temperature season migration coastal erosion restoration biodiversity ecosystem nutrient cycle "
    "the a of and to in is that for with as on by from at which be this are its can more"
).split()
PREPARED = re.compile(r"prepared (\d+) rows in ([\d.]+) s \((\d+) rows/s, (\d+) process(?:es)?\)")
LOOP_START = re.compile(rb"train:[^\r\n]*\b0/\d")
"""The training loop's first progress line: the first step starts (its data, model and optimizer are ready)."""
FIRST_STEP = re.compile(rb"train:[^\r\n]*\b1/\d")
"""The first step done (forward, backward and optimizer step of its batch)."""


def generate(path: Path, rows: int, seed: int = 0) -> Path:
    """``rows`` Alpaca-shaped rows (instruction, input, output ~60 words), written once."""
    if path.exists():
        return path
    rng = random.Random(seed)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        for i in range(rows):
            words = rng.choices(WORDS, k=rng.randint(40, 80))
            a, b, c = rng.choice(WORDS), rng.choice(WORDS), rng.choice(WORDS)
            row = {
                "instruction": f"Question {i}: what does the {a} {b} do for the {c}?",
                "input": "" if i % 3 else f"Context {rng.choice(WORDS)} {rng.choice(WORDS)}.",
                "output": " ".join(words).capitalize() + ".",
            }
            f.write(json.dumps(row) + "\n")
    tmp.rename(path)
    return path


def generate_bytes(path: Path, gigabytes: float) -> Path:
    """A JSONL file of about ``gigabytes`` GB: the generated rows repeated with new numbers."""
    if path.exists():
        return path
    block = generate(path.parent / "block_100k.jsonl", 100_000).read_bytes()
    target, written, k = int(gigabytes * 1e9), 0, 0
    with open(path.with_suffix(".tmp"), "wb") as f:
        while written < target:
            chunk = block.replace(b"Question ", f"Question {k}-".encode())
            f.write(chunk)
            written += len(chunk)
            k += 1
    path.with_suffix(".tmp").rename(path)
    return path


def measured(cmd: list[str], env: dict, timeout: float = 7200) -> dict:
    """Run ``cmd`` under /usr/bin/time -v; wall, exit code, output, peak RSS (largest process and tree sum)."""
    import psutil

    t0 = time.perf_counter()
    proc = subprocess.Popen(["/usr/bin/time", "-v", *cmd], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    peak = [0]
    first_step: list[float] = []
    loop_start: list[float] = []
    err = bytearray()

    def sample():
        p = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                tree = [p, *p.children(recursive=True)]
                peak[0] = max(peak[0], sum(q.memory_info().rss for q in tree if q.is_running()))
            except psutil.Error:
                pass
            time.sleep(0.2)

    def read_err():
        for chunk in iter(lambda: proc.stderr.read1(4096), b""):
            err.extend(chunk)
            if not loop_start and LOOP_START.search(err[-8192:]):
                loop_start.append(time.perf_counter() - t0)
            if not first_step and FIRST_STEP.search(err[-8192:]):
                first_step.append(time.perf_counter() - t0)

    threads = [threading.Thread(target=sample, daemon=True), threading.Thread(target=read_err, daemon=True)]
    for t in threads:
        t.start()
    out = proc.stdout.read().decode()
    proc.wait(timeout)
    for t in threads:
        t.join(5)
    text = err.decode(errors="replace")
    max_rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    return {
        "rc": proc.returncode,
        "wall_s": round(time.perf_counter() - t0, 1),
        "loop_start_s": round(loop_start[0], 1) if loop_start else None,
        "first_step_s": round(first_step[0], 1) if first_step else None,
        "max_rss_gb": round(int(max_rss.group(1)) / 1e6, 2) if max_rss else None,
        "tree_rss_gb": round(peak[0] / 1e9, 2),
        "stdout": out,
        "stderr_tail": text[-3000:],
    }


def engine(args: list[str], work: Path, env: dict) -> dict:
    run_dir = work / "runs" / f"{time.time_ns()}"
    r = measured([sys.executable, "-m", "engine", *args, f"hydra.run.dir={run_dir}"], env)
    metrics = run_dir / "metrics.json"
    r["metrics"] = json.loads(metrics.read_text()) if metrics.exists() else None
    m = PREPARED.search(r["stdout"])
    r["prepared"] = {"rows": int(m[1]), "seconds": float(m[2]), "rows_per_s": int(m[3]), "processes": int(m[4])} if m else None
    if r["rc"] != 0:
        print(r["stderr_tail"], file=sys.stderr)
    return r


BASELINE = r"""
import json, os, sys, time
from engine.config import load
from engine.model import convert_gguf_once
from engine.data.templates import template_source
from engine.data.tokens import encode_many
from transformers import AutoTokenizer
from datasets import load_dataset

path, procs, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
cfg = load(["stages=[prepare_data]", "data=auto", f"data.path={path}"])
tok = AutoTokenizer.from_pretrained(convert_gguf_once(cfg.model.package, cfg.model.file, progress=False))
source = template_source(cfg.data.template, tok)
assert source == tok.chat_template, "the plain baseline renders with the tokenizer's own template"
max_length = cfg.data.max_length

def conversations(batch):
    convs = []
    for ins, inp, out in zip(batch["instruction"], batch["input"], batch["output"]):
        user = ins + ("\n\n" + inp if inp else "")
        convs.append([{"role": "user", "content": user}, {"role": "assistant", "content": out}])
    return convs

def plain(batch):
    convs = conversations(batch)
    texts = tok.apply_chat_template(convs, tokenize=False)
    prompts = tok.apply_chat_template([c[:-1] for c in convs], tokenize=False, add_generation_prompt=True)
    enc = tok(texts, add_special_tokens=False, return_offsets_mapping=True, truncation=True, max_length=max_length)
    labels = [
        [i if len(p) <= o[0] < len(t.rstrip()) else -100 for i, o in zip(ids, offsets)]
        for ids, offsets, p, t in zip(enc["input_ids"], enc["offset_mapping"], prompts, texts)
    ]
    return {"input_ids": enc["input_ids"], "labels": labels}

def encoder(batch):
    enc = encode_many(source, conversations(batch), tok, max_length, False)
    return {"input_ids": [e[0] for e in enc], "labels": [e[1] for e in enc]}

fn = {"plain": plain, "encoder": encoder}[mode]
head = [json.loads(line) for _, line in zip(range(2000), open(path))]
batch = {k: [r[k] for r in head] for k in ("instruction", "input", "output")}
assert fn(batch) == encoder(batch), "the baseline's ids and labels are engine's"

t0 = time.perf_counter()
ds = load_dataset("json", data_files=path, split="train", cache_dir=os.environ["BASELINE_CACHE"])
ds = ds.map(fn, batched=True, batch_size=512, num_proc=procs, remove_columns=ds.column_names)
dt = time.perf_counter() - t0
print(json.dumps({"rows": len(ds), "seconds": round(dt, 1), "rows_per_s": round(len(ds) / dt)}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--cases", default="prepare,baseline,baseline_encoder,second,train_rss,stream")
    ap.add_argument("--stream-gb", type=float, nargs="*", default=[0.5, 5.0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/engine_data_scale"))
    ap.add_argument("--json", type=Path, default=None, help="write the results here too")
    ap.add_argument(
        "--torch-threads",
        type=int,
        default=None,
        help="OMP_NUM_THREADS for the training runs (1 on a machine shared with other jobs)",
    )
    a = ap.parse_args()
    work, cases = a.work, a.cases.split(",")
    (work / "cache").mkdir(parents=True, exist_ok=True)
    models = Path.home() / ".cache" / "engine" / "models"
    if models.is_dir() and not (work / "cache" / "models").exists():
        (work / "cache" / "models").symlink_to(models)
    env = {**os.environ, "ENGINE_CACHE": str(work / "cache"), "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    train_env = {**env, "OMP_NUM_THREADS": str(a.torch_threads)} if a.torch_threads else env
    rows = generate(work / f"rows_{a.rows}.jsonl", a.rows)
    base = ["data=auto", f"data.path={rows}", "device=cpu"]
    procs = len(os.sched_getaffinity(0))
    out: dict = {
        "torch_threads": a.torch_threads,
        "rows": a.rows,
        "file_mb": round(rows.stat().st_size / 1e6),
        "cores": procs,
        "load_before": os.getloadavg(),
    }

    if "prepare" in cases:
        shutil.rmtree(work / "cache" / "data", ignore_errors=True)
        r = engine([*base, "stages=[prepare_data]"], work, env)
        out["prepare"] = {k: r[k] for k in ("rc", "wall_s", "max_rss_gb", "tree_rss_gb", "prepared")}
        print("prepare", json.dumps(out["prepare"]), flush=True)
    for case, mode in (("baseline", "plain"), ("baseline_encoder", "encoder")):
        if case not in cases:
            continue
        bdir = work / "baseline_cache"
        shutil.rmtree(bdir, ignore_errors=True)
        r = measured([sys.executable, "-c", BASELINE, str(rows), str(procs), mode], {**env, "BASELINE_CACHE": str(bdir)})
        line = [x for x in r["stdout"].splitlines() if x.startswith("{")]
        out[case] = {"rc": r["rc"], "max_rss_gb": r["max_rss_gb"], "tree_rss_gb": r["tree_rss_gb"]}
        out[case] |= json.loads(line[-1]) if line else {"error": r["stderr_tail"][-500:]}
        shutil.rmtree(bdir, ignore_errors=True)
        print(case, json.dumps(out[case]), flush=True)
    if "second" in cases:
        r = engine([*base, "stages=[prepare_data,train]", "train.max_steps=1"], work, train_env)
        prep = (r["metrics"] or {}).get("prepare_data", {})
        out["second"] = {k: r[k] for k in ("rc", "wall_s", "loop_start_s", "first_step_s", "max_rss_gb", "tree_rss_gb")}
        out["second"] |= {
            "cache_hit": prep.get("cache_hit"),
            "data_seconds": prep.get("prepare_seconds"),
            "prepared": r["prepared"],
        }
        out["second"]["train_time_to_first_step_s"] = ((r["metrics"] or {}).get("train") or {}).get("time_to_first_step_s")
        print("second", json.dumps(out["second"]), flush=True)
    if "train_rss" in cases:
        small = generate(work / "rows_1000.jsonl", 1000, seed=1)
        res = {}
        for name, path in (("rows_1000", small), (f"rows_{a.rows}", rows)):
            args = ["data=auto", f"data.path={path}", "device=cpu", "stages=[prepare_data,train]", "train.max_steps=2"]
            engine(args, work, train_env)  # fill the cache: the measured run is a hit
            r = engine(args, work, train_env)
            res[name] = {k: r[k] for k in ("rc", "wall_s", "max_rss_gb", "tree_rss_gb")}
        res["ratio"] = round(res[f"rows_{a.rows}"]["max_rss_gb"] / res["rows_1000"]["max_rss_gb"], 2)
        out["train_rss"] = res
        print("train_rss", json.dumps(res), flush=True)
    if "stream" in cases:
        res = {}
        for gb in a.stream_gb:
            path = generate_bytes(work / f"stream_{gb:g}gb.jsonl", gb)
            args = ["data=auto", f"data.path={path}", "device=cpu", "stages=[prepare_data,train]"]
            r = engine([*args, "data.streaming=true", "train.max_steps=3"], work, train_env)
            res[f"{gb:g}GB"] = {k: r[k] for k in ("rc", "wall_s", "max_rss_gb", "tree_rss_gb")}
            res[f"{gb:g}GB"]["file_gb"] = round(path.stat().st_size / 1e9, 2)
        out["stream"] = res
        print("stream", json.dumps(res), flush=True)
    out["load_after"] = os.getloadavg()
    print(json.dumps(out, indent=1))
    if a.json:
        a.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
