"""The default recipe's adapter served over HTTP: switched with POST /lora-adapters on the
shipped Q4_1 base, the held-out prompts asked through the official openai client.

    python bench/serve_http_smollm2.py --run-dir outputs/lora_smollm2/<time> --prompts 4

Starts ``python -m engine recipe=serve_smollm2 eval.run_dir=<run>`` (llamacpp backend: the
run's LoRA as a GGUF adapter on the packaged base), then per prompt: the run's adapter active
(`POST /lora-adapters` with the adapter at scale 1), then cleared (`[]`: the base alone), greedy.
Reports how many answers differ between adapter and base, and, where
bench/results/serve_adapter_smollm2.json has the same prompt, whether the HTTP answer equals the
backend's direct answer there (the one compared with the HF adapter model).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from serve_adapter_smollm2 import held_out, specs  # noqa: E402
from serve_load import free_port, wait_ready  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def post(url: str, body) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run-dir", type=Path, required=True)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    from openai import OpenAI
    from transformers import AutoTokenizer

    from engine.model import convert_gguf_once

    run_dir = args.run_dir.resolve()
    model_spec, _, data_spec, raw = specs(run_dir)
    tok = AutoTokenizer.from_pretrained(convert_gguf_once(model_spec.package, model_spec.file))
    _, messages = held_out(data_spec, tok, raw, args.prompts)
    direct = json.loads((ROOT / "bench/results/serve_adapter_smollm2.json").read_text())["rows"]
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "engine", "recipe=serve_smollm2", f"eval.run_dir={run_dir}", f"serve.port={port}",
               f"serve.threads={args.threads}", f"hydra.run.dir={tmp}/run"]  # fmt: skip
        log = open(Path(tmp) / "log", "w")  # noqa: SIM115
        proc = subprocess.Popen(cmd, cwd=tmp, env=dict(os.environ, HF_HUB_OFFLINE="1"), stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_ready(port, proc)
            url = f"http://127.0.0.1:{port}"
            client = OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
            base_id = client.models.list().data[0].id
            state = json.loads(urllib.request.urlopen(url + "/lora-adapters").read())
            names = [a["name"] for a in state]
            print("loaded adapters:", state)
            rows = []
            for i, m in enumerate(messages):
                answers = {}
                for label, body in (("adapter", {"adapters": [{"name": names[0], "scale": 1.0}]}), ("base", [])):
                    post(url + "/lora-adapters", body)
                    t = time.perf_counter()
                    r = client.chat.completions.create(model=base_id, messages=m, temperature=0, max_tokens=32)
                    answers[label] = r.choices[0].message.content
                    answers[label + "_s"] = round(time.perf_counter() - t, 2)
                d = direct[i] if i < len(direct) else {}
                same_a = answers["adapter"].strip() == d.get("served_adapter", "").strip()
                same_b = answers["base"].strip() == d.get("served_base", "").strip()
                rows.append(answers | {"same_as_direct_adapter": same_a, "same_as_direct_base": same_b})
                print(json.dumps(rows[-1]), flush=True)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
            log.close()
    n = len(rows)
    print(f"\nadapter answer differs from base: {sum(r['adapter'] != r['base'] for r in rows)}/{n}; "
          f"HTTP adapter == direct backend adapter: {sum(r['same_as_direct_adapter'] for r in rows)}/{n}; "
          f"HTTP base == direct base: {sum(r['same_as_direct_base'] for r in rows)}/{n}")  # fmt: skip


if __name__ == "__main__":
    main()
