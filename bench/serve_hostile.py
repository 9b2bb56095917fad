"""The server under hostile input (issue 29): statuses and the server's CPU seconds per request.

    python bench/serve_hostile.py                     # both backends: serve=llamacpp (SmolLM2 Q4_1), serve=hf model=tiny
    python bench/serve_hostile.py --backends llamacpp

Each backend runs as a user starts it (``python -m engine recipe=serve_smollm2 serve.port=0 ...``,
a subprocess) and gets a fixed catalogue: one request per category of issue 29 (text that is not
Unicode, deep nesting, token ids out of range, sampling at the edges, malformed HTTP, seeded
repeats) and the costliest bodies found (20,000 one-letter messages, 1 MB of special tokens, ...),
each alone, then six of the costliest at once. Measured per request: the status and the CPU
seconds the server process spent (user + system from /proc/<pid>/stat, before and after the
answer: everything the request caused, in any thread). Reported: requests tried, 5xx seen, the
worst single request's CPU seconds and its name.

Results: bench/results/serve_hostile_<stamp>.json; a table is printed for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TICK = os.sysconf("SC_CLK_TCK")
LONGEST = {"llamacpp": 81, "hf": 14}
"""Longest token (bytes; characters for hf) of each backend's model: SmolLM2's GGUF vocab, the tiny tokenizer."""
ARGS = {
    "llamacpp": ["recipe=serve_smollm2", "serve.threads=1"],
    "hf": ["recipe=serve_smollm2", "serve=hf", "model=tiny", "device=cpu"],
}


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime


def start(backend: str, run_dir: Path) -> tuple[subprocess.Popen, str, int]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("ENGINE_API_KEY", None)
    cmd = [sys.executable, "-m", "engine", *ARGS[backend], "serve.port=0", f"hydra.run.dir={run_dir}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in proc.stdout:
        if line.startswith("Serving on "):
            host, port = line.split()[2].removeprefix("http://").split(":")
            threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep the pipe drained
            return proc, host, int(port)
    raise RuntimeError(f"{backend}: the server exited ({proc.wait()}) before printing its URL")


def call(host: str, port: int, method: str, path: str, raw: bytes | None) -> tuple[int, str]:
    conn = http.client.HTTPConnection(host, port, timeout=600)
    conn.request(method, path, body=raw, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    out = resp.status, resp.read().decode("utf-8", "replace")
    conn.close()
    return out


def raw_http(host: str, port: int, data: bytes) -> tuple[int, str]:
    with socket.create_connection((host, port), timeout=60) as sock:
        sock.sendall(data)
        got = b""
        while chunk := sock.recv(65536):
            got += chunk
    head, _, body = got.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode("utf-8", "replace")


def catalogue(model: str, ctx: int, longest: int) -> list[tuple[str, str, str, bytes]]:
    """(name, method, path, raw body) of every request tried alone; ``longest``: the model's
    longest token in bytes, so two bodies sit just under the token floor (tokenized, then refused)."""

    def chat(**fields) -> bytes:
        return json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **fields}).encode()

    def chat_of(content: str, n: int = 1, **fields) -> bytes:
        return chat(messages=[{"role": "user", "content": content}] * n, **fields)

    def prompt(value) -> bytes:
        return json.dumps({"model": model, "prompt": value}).encode()

    special, deep = "<|im_end|>", "[" * 100_000 + "]" * 100_000
    haiku = "Write a haiku about rain."
    per_message = max(1, 900_000 // (ctx * (len(special) + 30)))
    return [
        ("surrogate in content", "POST", "/v1/chat/completions", chat_of("\ud800")),
        ("surrogate in model", "POST", "/v1/chat/completions", chat(model="x\ud800")),
        ("surrogate in prompt", "POST", "/v1/completions", prompt("\udfff")),
        ("surrogate in adapter name", "POST", "/lora-adapters", json.dumps([{"name": "\ud800"}]).encode()),
        ("UTF-8 bytes of a surrogate", "POST", "/v1/chat/completions", b'{"model": "\xed\xa0\x80"}'),
        ("nested 100k deep, body", "POST", "/v1/chat/completions", deep.encode()),
        ("nested 100k deep, extra field", "POST", "/v1/chat/completions", chat()[:-1] + b', "x": ' + deep.encode() + b"}"),
        ("nested 100k deep, content", "POST", "/v1/chat/completions", chat_of("D").replace(b'"D"', deep.encode())),
        ("token id -1", "POST", "/v1/completions", prompt([-1])),
        ("token id past the vocabulary", "POST", "/v1/completions", prompt([10**6])),
        ("seed 2**64", "POST", "/v1/chat/completions", chat(seed=2**64)),
        ("temperature 1e-300", "POST", "/v1/chat/completions", chat(temperature=1e-300)),
        ("top_p 1e-300", "POST", "/v1/chat/completions", chat(top_p=1e-300)),
        ("adapter scale 1e30", "POST", "/lora-adapters", json.dumps([{"id": 0, "scale": 1e30}]).encode()),
        ("seeded haiku", "POST", "/v1/chat/completions", chat_of(haiku, seed=1234, temperature=0.9, max_tokens=24)),
        ("seeded haiku again", "POST", "/v1/chat/completions", chat_of(haiku, seed=1234, temperature=0.9, max_tokens=24)),
        ("20000 one-letter messages (0.7 MB)", "POST", "/v1/chat/completions", chat_of("a", 20_000)),
        (f"{ctx} one-letter messages", "POST", "/v1/chat/completions", chat_of("a", ctx)),
        (f"{ctx} messages of {per_message} special tokens", "POST", "/v1/chat/completions", chat_of(special * per_message, ctx)),
        ("one message of 90k special tokens", "POST", "/v1/chat/completions", chat_of(special * 90_000)),
        ("one message of 900 kB plain text", "POST", "/v1/chat/completions", chat_of("word " * 180_000)),
        ("prompt of 90k special tokens", "POST", "/v1/completions", prompt(special * 90_000)),
        ("prompt of 900 kB plain text", "POST", "/v1/completions", prompt("ab " * 300_000)),
        (f"prompt of {ctx - 50} special tokens (fits: served)", "POST", "/v1/completions", prompt(special * (ctx - 50))),
        (
            "plain text just under the floor (tokenized, refused)",
            "POST",
            "/v1/completions",
            prompt("ab " * ((ctx - 50) * longest // 3)),
        ),
    ]


MALFORMED = [
    ("Content-Length: abc", b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n"),
    ("Content-Length: -5", b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n"),
    ("invalid header name", b"GET /health HTTP/1.1\r\nHost: x\r\nBad Header: 1\r\n\r\n"),
    ("20 kB header block", b"GET /health HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 20_000 + b"\r\n"),
    ("garbage request line", b"GARBAGE\r\n\r\n"),
]


def run_backend(backend: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        proc, host, port = start(backend, Path(tmp) / "run")
        try:
            models = json.loads(call(host, port, "GET", "/v1/models", None)[1])["data"]
            model, ctx = models[0]["id"], models[0]["context_length"]
            rows = []
            for name, method, path, raw in catalogue(model, ctx, LONGEST[backend]):
                before = cpu_s(proc.pid)
                status, body = call(host, port, method, path, raw)
                rows.append({"request": name, "bytes": len(raw), "status": status, "cpu_s": round(cpu_s(proc.pid) - before, 3)})
                rows[-1]["code"] = json.loads(body).get("error", {}).get("code") if status >= 400 else None
                if name.startswith("seeded"):
                    rows[-1]["answer"] = json.loads(body)["choices"][0]["message"]["content"]
            for name, data in MALFORMED:
                before = cpu_s(proc.pid)
                status, body = raw_http(host, port, data)
                code = json.loads(body)["error"]["code"]
                rows.append(
                    {
                        "request": name,
                        "bytes": len(data),
                        "status": status,
                        "cpu_s": round(cpu_s(proc.pid) - before, 3),
                        "code": code,
                    }
                )
            # Six of the costliest at once: rendered one at a time in the gate, never six in parallel.
            burst = [raw for name, _, _, raw in catalogue(model, ctx, LONGEST[backend]) if name.startswith("20000")] * 6
            before, wall = cpu_s(proc.pid), time.perf_counter()
            threads = [threading.Thread(target=call, args=(host, port, "POST", "/v1/chat/completions", raw)) for raw in burst]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            concurrent = {
                "requests": 6,
                "cpu_s": round(cpu_s(proc.pid) - before, 3),
                "wall_s": round(time.perf_counter() - wall, 3),
            }
            health = call(host, port, "GET", "/health", None)[0]
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    worst = max(rows, key=lambda r: r["cpu_s"])
    refused = max((r for r in rows if r["status"] >= 400), key=lambda r: r["cpu_s"])
    seeded = [r["answer"] for r in rows if "answer" in r]
    return {
        "backend": backend,
        "model": model,
        "context_length": ctx,
        "requests": len(rows) + concurrent["requests"],
        "status_5xx": sum(r["status"] >= 500 for r in rows),
        "worst": {"request": worst["request"], "cpu_s": worst["cpu_s"]},
        "worst_refused": {"request": refused["request"], "cpu_s": refused["cpu_s"]},
        "seeded_repeat_equal": len(set(seeded)) == 1,
        "concurrent_costliest": concurrent,
        "health_after": health,
        "rows": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backends", default="llamacpp,hf")
    args = parser.parse_args()
    results = [run_backend(b) for b in args.backends.split(",")]
    stamp = time.strftime("%Y%m%d_%H%M")
    record = {"command": " ".join(["python", "bench/serve_hostile.py", *sys.argv[1:]]), "date": stamp,
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores", "load_avg": os.getloadavg(),
              "results": results}  # fmt: skip
    out = ROOT / "bench" / "results" / f"serve_hostile_{stamp}.json"
    out.write_text(json.dumps(record, indent=1, ensure_ascii=True))
    for r in results:
        worst, refused = r["worst"], r["worst_refused"]
        print(f"\n{r['backend']} ({r['model']}, context {r['context_length']}): {r['requests']} requests, {r['status_5xx']} 5xx, "
              f"worst {worst['cpu_s']} CPU s ({worst['request']}), "
              f"worst refused {refused['cpu_s']} CPU s ({refused['request']}); "
              f"seeded repeat equal: {r['seeded_repeat_equal']}; 6 costliest at once: {r['concurrent_costliest']}; "
              f"/health after: {r['health_after']}")  # fmt: skip
        print("| request | bytes | status | code | server CPU s |\n|---|---|---|---|---|")
        for row in r["rows"]:
            print(f"| {row['request']} | {row['bytes']} | {row['status']} | {row['code'] or ''} | {row['cpu_s']} |")
    print(f"\nwritten: {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
