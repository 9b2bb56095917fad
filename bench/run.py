"""Training benchmark: engine vs TRL ``SFTTrainer`` + PEFT on the same work, side by side.

    python bench/run.py                                  # CPU: SmolLM2-135M, 20 steps, A/B x2
    python bench/run.py --model tiny --steps 2 --reps 1  # smoke run (seconds)
    python bench/run.py --arms engine,trl_default,trl_fp32_packing --steps 20 --reps 2
    python bench/run.py --model phi2_random              # CUDA only: phi-2 shapes, QLoRA, random init

Why a separate process per arm: each run pays its own imports and model load (that is the
"time to first step" a user sees), peak RSS is per process, and neither framework can leave
threads, caches or compiled kernels behind for the other. Arms alternate A/B/A/B so a
neighbour's load on a shared machine hits both sides alike.

Both arms get the same model weights (built by engine's model registry), the same rows (the
train split engine's ``prepare`` makes from ``engine/samples/env_science_qa.jsonl``), the same
LoRA config (the ``adapter`` group: r=16 on all 7 projections), max length, micro-batch x
gradient accumulation, learning-rate schedule, precision and number of optimizer steps. Both
train on response tokens only (engine: ``train_on_prompt=false``; TRL: prompt/completion
rows, ``completion_only_loss``).

Reported per run: real (non-pad) tokens/s and padded tokens/s in the steady state (steps
2..N; step 1 pays warm-up), padding efficiency, time from process start to the end of the
first optimizer step, peak RSS (peak CUDA memory on a GPU), the loss per step, and achieved
FLOP/s against the machine's measured matmul FLOP/s (the roofline fraction). The FLOP count
is the work the step must do, the same formula for both arms (see ``useful_flops``).

Results land in bench/results/<stamp>.json; bench/RESULTS.md is where they are written up.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONF = str(ROOT / "engine" / "conf")

# What every arm shares. Matched on purpose; only the framework (and its own knobs) differ.
SHARED = {
    "micro_batch_size": 4,
    "grad_accum": 2,
    "lr": 3e-4,
    "warmup_steps": 2,
    "schedule": "cosine",
    "max_grad_norm": 1.0,
    "max_length": 512,
    "seed": 0,
}

# Arms: framework + its own settings. "precision" is the precision the arm trains in.
#   engine            engine's defaults (precision=auto -> fp32 on a CPU without native bf16)
#   engine_packed     + data.packing (block-diagonal attention, no padding)
#   engine_grouped    + data.group_by_length (batches of similar lengths, less padding)
#   engine_compiled   packed + train.compile (regional torch.compile)
#   *_unfused         the same with adapter.fused=false (PEFT's LoRA forward: before/after)
#   engine_packed_prev  packed as it was before fused LoRA and train.keep_freed_memory
#   engine_4k         engine defaults without the huge-page heap (ENGINE_HUGE_PAGES=0)
#   engine_packed_4k  packed without the huge-page heap (ENGINE_HUGE_PAGES=0): before/after
#   engine_bf16       engine forced to bf16 autocast (for the fp32-vs-bf16 measurement)
#   trl_default       SFTTrainer defaults for everything not matched: bf16=True,
#                     gradient_checkpointing=True, no packing (use_cpu=True on a CPU)
#   trl_fp32          TRL's fastest fp32 settings without packing: no checkpointing
#   trl_fp32_hugetlb  trl_fp32 with the same glibc huge-page heap engine runs with
#   trl_fp32_packing  + packing=True (BFD, padding-free)
#   trl_bf16_packing  the same in bf16 autocast
ARMS: dict[str, dict] = {
    "engine": {"framework": "engine", "overrides": []},
    "engine_packed": {"framework": "engine", "overrides": ["data.packing=true"]},
    "engine_unfused": {"framework": "engine", "overrides": ["adapter.fused=false"]},
    "engine_packed_unfused": {"framework": "engine", "overrides": ["data.packing=true", "adapter.fused=false"]},
    "engine_packed_prev": {
        "framework": "engine",
        "overrides": ["data.packing=true", "adapter.fused=false", "train.keep_freed_memory=false"],
    },
    "engine_4k": {"framework": "engine", "overrides": [], "env": {"ENGINE_HUGE_PAGES": "0"}},
    "engine_packed_4k": {"framework": "engine", "overrides": ["data.packing=true"], "env": {"ENGINE_HUGE_PAGES": "0"}},
    "engine_grouped": {"framework": "engine", "overrides": ["data.group_by_length=true"]},
    "engine_compiled": {"framework": "engine", "overrides": ["data.packing=true", "train.compile=true"]},
    "engine_bf16": {"framework": "engine", "overrides": ["precision=bf16"]},
    "engine_fp32": {"framework": "engine", "overrides": ["precision=fp32"]},
    "trl_default": {"framework": "trl", "sft": {}},
    "trl_fp32": {"framework": "trl", "sft": {"bf16": False, "gradient_checkpointing": False}},
    "trl_fp32_hugetlb": {
        "framework": "trl",
        "sft": {"bf16": False, "gradient_checkpointing": False},
        "env": {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"},
    },
    "trl_fp32_packing": {"framework": "trl", "sft": {"bf16": False, "gradient_checkpointing": False, "packing": True}},
    "trl_bf16_packing": {"framework": "trl", "sft": {"bf16": True, "gradient_checkpointing": False, "packing": True}},
}

# Models: engine's model preset plus what the GPU row needs.
MODELS = {
    "smollm2": {"overrides": ["model=smollm2_135m"]},
    "tiny": {"overrides": ["model=tiny"]},
    # phi-2 shapes (2.7B), random init, 4-bit NF4 base + LoRA: no download is possible here, and
    # speed does not depend on the weights' values. CUDA only (bitsandbytes 4-bit on a CPU is slow).
    "phi2_random": {"overrides": ["model=phi2", "quantization=nf4", "model.gradient_checkpointing=false"]},
}

PHI2_CONFIG = {
    "architectures": ["PhiForCausalLM"],
    "model_type": "phi",
    "vocab_size": 51200,
    "hidden_size": 2560,
    "intermediate_size": 10240,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "partial_rotary_factor": 0.4,
    "rope_theta": 10000.0,
    "hidden_act": "gelu_new",
    "max_position_embeddings": 2048,
    "layer_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "qk_layernorm": False,
    "resid_pdrop": 0.1,
    "embd_pdrop": 0.0,
    "attention_dropout": 0.0,
    "bos_token_id": 50256,
    "eos_token_id": 50256,
}


# ----------------------------------------------------------------------------- parent


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", choices=sorted(MODELS))
    p.add_argument("--arms", default="engine,trl_default", help=f"comma list from: {', '.join(ARMS)}")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per run")
    p.add_argument("--reps", type=int, default=2, help="repetitions (arms alternate within each)")
    p.add_argument("--engine-override", action="append", default=[], help="extra engine override for engine arms")
    p.add_argument("--out", type=Path, default=None, help="result JSON (default bench/results/<stamp>.json)")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per run")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(json.loads(args.worker))

    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        p.error(f"unknown arm(s) {unknown}; valid: {', '.join(ARMS)}")
    if args.model == "phi2_random" and not _cuda():
        p.error("--model phi2_random needs a CUDA GPU (4-bit NF4 QLoRA); use --model smollm2 on a CPU")

    machine = machine_info()
    print(f"[bench] {machine['cpu']} ({machine['cores']} cores), load {machine['loadavg']}", flush=True)
    machine["matmul_gflops"] = matmul_gflops()
    print(f"[bench] matmul GFLOP/s: {machine['matmul_gflops']}", flush=True)

    runs = []
    for rep in range(args.reps):
        for arm in arms:
            job = {"arm": arm, "rep": rep, "model": args.model, "steps": args.steps, "extra": args.engine_override}
            rec = launch(job, args.timeout)
            rec["flops"] = flops_summary(rec, machine["matmul_gflops"])
            runs.append(rec)
            print(f"[bench] {one_line(rec)}", flush=True)

    summary = summarise(runs, arms)
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "command": "python bench/run.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine,
        "shared": SHARED,
        "arms": {a: ARMS[a] for a in arms},
        "runs": runs,
        "summary": summary,
    }
    out = args.out or ROOT / "bench" / "results" / f"{time.strftime('%Y%m%d_%H%M%S')}_{args.model}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(markdown(result))
    print(f"[bench] wrote {out}")
    return 0


def launch(job: dict, timeout: int) -> dict:
    """Run one arm in a fresh interpreter; time to first step is measured from here."""
    with tempfile.TemporaryDirectory(prefix="bench_") as tmp:
        job = {**job, "run_dir": str(Path(tmp) / "run")}
        log = Path(job["run_dir"]) / "train_log.jsonl"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
        env.update(ARMS[job["arm"]].get("env", {}))
        if ARMS[job["arm"]]["framework"] == "engine":
            from engine.speed.memory import huge_pages_env

            # As `python -m engine` runs: it restarts itself with glibc's huge-page heap.
            env = huge_pages_env(env) or env
        t0 = time.time()
        proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(job)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        first_step = None
        while proc.poll() is None:
            if first_step is None and log.exists() and log.stat().st_size > 0:
                first_step = time.time() - t0
            if time.time() - t0 > timeout:
                proc.kill()
                break
            time.sleep(0.05)
        out, err = proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f"[bench] arm {job['arm']} failed (exit {proc.returncode}):\n{err[-4000:]}")
        line = next(x for x in reversed(out.splitlines()) if x.startswith("BENCH_RESULT "))
        rec = json.loads(line[len("BENCH_RESULT ") :])
        rec["time_to_first_step_s"] = round(first_step, 2) if first_step is not None else None
        rec["process_s"] = round(time.time() - t0, 2)
        return rec


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def machine_info() -> dict:
    cpu = "unknown"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                cpu = line.split(":", 1)[1].strip()
    except OSError:
        pass
    flags = open("/proc/cpuinfo").read() if Path("/proc/cpuinfo").exists() else ""
    import torch

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_bf16_native": any(f in flags for f in ("avx512_bf16", "amx_bf16")),
        "avx512": "avx512f" in flags,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        "torch": torch.__version__,
    }


def matmul_gflops(seconds: float = 1.0) -> dict:
    """Best-of-several square matmul rate per dtype: the roof that training is measured against.

    bf16 gets a smaller matrix: on a CPU without native bf16 (AVX2 only) it runs at about
    1 GFLOP/s, and a 2048^3 product would take most of a minute.
    """
    import torch

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    out = {}
    for name, dtype, n in (("fp32", torch.float32, 2048), ("bf16", torch.bfloat16, 768)):
        n = 8192 if dev == "cuda" else n
        a = torch.randn(n, n, device=dev).to(dtype)
        b = torch.randn(n, n, device=dev).to(dtype)
        a @ b  # warm-up (kernel selection, page faults)
        best, t_end = 0.0, time.perf_counter() + seconds
        while True:
            t = time.perf_counter()
            a @ b
            if dev == "cuda":
                torch.cuda.synchronize()
            best = max(best, 2 * n**3 / (time.perf_counter() - t) / 1e9)
            if time.perf_counter() > t_end:
                break
        out[name] = round(best, 1)
    return out


def useful_flops(rec: dict) -> float:
    """FLOPs a LoRA step must do for the tokens it trained, counted alike for every arm.

    Per real token: 4 x frozen body params (forward 2 + input-gradient 2; no weight
    gradients) + 6 x trainable LoRA params (forward 2 + both gradients 4). Per labelled
    token: 4 x vocab x hidden for the LM head (forward + input gradient). Attention:
    QK^T and AV, causal (half the square), forward + 2x backward = 6 x layers x hidden x
    len^2 per sequence. Padding and masked-position logits are not useful work, so an arm
    that computes them gets no credit for it.
    """
    m = rec["model_shape"]
    return (
        rec["steady_real_tokens"] * (4 * m["body_params"] + 6 * m["trainable_params"])
        + rec["steady_labelled_tokens"] * 4 * m["vocab"] * m["hidden"]
        + rec["steady_sum_len_sq"] * 6 * m["layers"] * m["hidden"]
    )


def flops_summary(rec: dict, roof: dict) -> dict:
    secs = rec["steady_seconds"]
    if not secs:
        return {}
    achieved = useful_flops(rec) / secs / 1e9
    peak = roof["bf16" if rec["precision"] == "bf16" else "fp32"]
    return {"achieved_gflops": round(achieved, 1), "roof_gflops": peak, "fraction": round(achieved / peak, 3)}


def summarise(runs: list[dict], arms: list[str]) -> dict:
    """Median over repetitions per arm, and each arm's ratio against every TRL arm."""
    per = {}
    for arm in arms:
        rs = [r for r in runs if r["arm"] == arm]

        def med(key: str, rs=rs):
            xs = [r[key] for r in rs if r.get(key) is not None]
            return statistics.median(xs) if xs else None

        per[arm] = {
            "runs": len(rs),
            "precision": rs[0]["precision"],
            "real_tokens_per_s": med("real_tokens_per_s"),
            "padded_tokens_per_s": med("padded_tokens_per_s"),
            "padding_efficiency": med("padding_efficiency"),
            "time_to_first_step_s": med("time_to_first_step_s"),
            "peak_rss_mb": med("peak_rss_mb"),
            "peak_cuda_mb": med("peak_cuda_mb"),
            "roofline_fraction": statistics.median(r["flops"].get("fraction", 0) for r in rs),
            "tokens_trained": med("real_tokens"),
            "loss_first5": med("loss_first5"),
            "loss_last5": med("loss_last5"),
        }
    ratios = {}
    for a in arms:
        for b in arms:
            if ARMS[a]["framework"] == "engine" and ARMS[b]["framework"] == "trl" and per[b]["real_tokens_per_s"]:
                ratios[f"{a}/{b}"] = round(per[a]["real_tokens_per_s"] / per[b]["real_tokens_per_s"], 2)
    return {"per_arm": per, "ratios_real_tokens_per_s": ratios}


def one_line(r: dict) -> str:
    return (
        f"{r['arm']} rep {r['rep']}: {r['real_tokens_per_s']} real tok/s, {r['padded_tokens_per_s']} padded tok/s, "
        f"pad eff {r['padding_efficiency']}, first step {r['time_to_first_step_s']} s, RSS {r['peak_rss_mb']} MB, "
        f"loss {r['losses'][0]:.3f}->{r['losses'][-1]:.3f}, roofline {r['flops'].get('fraction')}"
    )


def markdown(result: dict) -> str:
    s = result["summary"]["per_arm"]
    rows = [
        "| arm | precision | real tok/s | padded tok/s | pad eff | first step (s) | peak RSS (MB) | peak CUDA (MB) "
        "| roofline | loss first5 -> last5 | tokens trained |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for arm, v in s.items():
        rows.append(
            f"| {arm} | {v['precision']} | {v['real_tokens_per_s']} | {v['padded_tokens_per_s']} | {v['padding_efficiency']} "
            f"| {v['time_to_first_step_s']} | {v['peak_rss_mb']} | {v['peak_cuda_mb'] or '-'} | {v['roofline_fraction']} "
            f"| {v['loss_first5']} -> {v['loss_last5']} | {v['tokens_trained']} |"
        )
    ratios = ", ".join(f"{k} = {v}x" for k, v in result["summary"]["ratios_real_tokens_per_s"].items())
    return "\n".join(rows) + f"\n\nratios (real tokens/s): {ratios}\n"


# ----------------------------------------------------------------------------- workers


def worker(job: dict) -> int:
    """Runs inside the fresh interpreter: train one arm, print one BENCH_RESULT line."""
    run_dir = Path(job["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    arm = ARMS[job["arm"]]
    overrides = [
        *MODELS[job["model"]]["overrides"],
        "stages=[prepare_data,train]",
        f"train.max_steps={job['steps']}",
        f"train.micro_batch_size={SHARED['micro_batch_size']}",
        f"train.grad_accum={SHARED['grad_accum']}",
        f"train.lr={SHARED['lr']}",
        f"train.warmup_steps={SHARED['warmup_steps']}",
        f"train.schedule={SHARED['schedule']}",
        f"train.max_grad_norm={SHARED['max_grad_norm']}",
        f"data.max_length={SHARED['max_length']}",
        f"seed={SHARED['seed']}",
    ]
    if job["model"] == "phi2_random":
        overrides.append(f"model.name_or_path={random_phi2_dir(run_dir.parent / 'phi2')}")
    if arm["framework"] == "engine":
        rec = run_engine_arm([*overrides, *arm["overrides"], *job.get("extra", [])], run_dir)
    else:
        rec = run_trl_arm(overrides, arm["sft"], run_dir)
    rec.update(arm=job["arm"], rep=job["rep"], model=job["model"], steps=job["steps"])
    rec["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    rec["glibc_tunables"] = os.environ.get("GLIBC_TUNABLES")
    import torch

    rec["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1) if torch.cuda.is_available() else None
    print("BENCH_RESULT " + json.dumps(rec), flush=True)
    return 0


class StepMeter:
    """Counts what each micro-batch holds, in order, so step k owns micro-batches [k*ga, (k+1)*ga)."""

    def __init__(self):
        self.micro: list[dict] = []

    def see(self, batch: dict) -> None:
        ids = batch["input_ids"]
        labels = batch.get("labels")
        mask = batch.get("attention_mask")
        pos = batch.get("position_ids")
        if mask is not None and mask.dim() == 2:
            lens = mask.sum(dim=1).tolist()
        else:
            lens = [ids.shape[1]] * ids.shape[0]
        if pos is not None:
            # Packed rows: each sequence restarts its positions at 0.
            lens = []
            for row, m in zip(
                pos.tolist(), (mask.tolist() if mask is not None and mask.dim() == 2 else [None] * pos.shape[0]), strict=False
            ):
                cur = 0
                for j, p_ in enumerate(row):
                    if m is not None and not m[j]:
                        continue
                    if p_ == 0 and cur:
                        lens.append(cur)
                        cur = 0
                    cur += 1
                if cur:
                    lens.append(cur)
        # engine counts its real tokens itself (packed rows are padded to the longest row).
        real = int(batch["real_tokens"]) if "real_tokens" in batch else int(sum(lens))
        self.micro.append(
            {
                "real": real,
                "padded": int(ids.numel()),
                "labelled": int((labels[:, 1:] != -100).sum()) if labels is not None else int(sum(lens)),
                "len_sq": int(sum(n * n for n in lens)),
            }
        )

    def per_step(self, steps: int, ga: int) -> list[dict]:
        out = []
        for k in range(steps):
            chunk = self.micro[k * ga : (k + 1) * ga]
            out.append({key: sum(c[key] for c in chunk) for key in ("real", "padded", "labelled", "len_sq")})
        return out


def finish(steps: list[dict], seconds: list[float], losses: list[float], precision: str, model, lengths: list[int]) -> dict:
    """Steady state = steps 2..N (step 1 pays lazy init, allocator growth, kernel choice)."""
    s = steps[1:] if len(steps) > 1 else steps
    t = sum(seconds[1:] if len(seconds) > 1 else seconds)
    real = sum(x["real"] for x in s)
    padded = sum(x["padded"] for x in s)
    return {
        "precision": precision,
        "losses": [round(x, 4) for x in losses],
        "loss_first5": round(statistics.mean(losses[:5]), 4),
        "loss_last5": round(statistics.mean(losses[-5:]), 4),
        "real_tokens": sum(x["real"] for x in steps),
        "padded_tokens": sum(x["padded"] for x in steps),
        "step_seconds": [round(x, 3) for x in seconds],
        "steady_seconds": round(t, 3),
        "steady_real_tokens": real,
        "steady_labelled_tokens": sum(x["labelled"] for x in s),
        "steady_sum_len_sq": sum(x["len_sq"] for x in s),
        "real_tokens_per_s": round(real / t, 1) if t else None,
        "padded_tokens_per_s": round(padded / t, 1) if t else None,
        "padding_efficiency": round(real / padded, 3) if padded else None,
        "model_shape": model_shape(model),
        "row_lengths": length_stats(lengths),
    }


def model_shape(model) -> dict:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = base.config
    emb = {id(p) for m in (base.get_input_embeddings(), base.get_output_embeddings()) if m is not None for p in m.parameters()}
    body = sum(p.numel() for p in model.parameters() if not p.requires_grad and id(p) not in emb)
    # 4-bit weights are stored packed two per byte; count the logical parameters.
    body += sum(p.numel() for p in model.parameters() if not p.requires_grad and p.dtype == __import__("torch").uint8)
    return {
        "body_params": body,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "vocab": cfg.vocab_size,
        "hidden": cfg.hidden_size,
        "layers": cfg.num_hidden_layers,
    }


def length_stats(lengths: list[int]) -> dict:
    xs = sorted(lengths)
    if not xs:
        return {}
    q = lambda f: xs[min(len(xs) - 1, int(f * len(xs)))]  # noqa: E731
    return {
        "n": len(xs),
        "min": xs[0],
        "p10": q(0.1),
        "p50": q(0.5),
        "mean": round(statistics.mean(xs), 1),
        "p90": q(0.9),
        "max": xs[-1],
    }


def run_engine_arm(overrides: list[str], run_dir: Path) -> dict:
    """engine's own path: compose + validate exactly as the CLI does, then the stage pipeline."""
    import engine.train.loop as trainer_mod
    from engine.config import load
    from engine.pipeline import run

    cfg = load(overrides, str(CONF))
    meter = StepMeter()
    _meter_engine_batches(trainer_mod, meter)
    ctx = run(cfg, run_dir)
    log = [json.loads(x) for x in (run_dir / "train_log.jsonl").read_text().splitlines() if x.strip()]
    steps = meter.per_step(len(log), cfg.train.grad_accum)
    # The trainer logs real tokens and tokens/s per step; its step time is tokens / rate.
    seconds = [r["tokens"] / r["tokens_per_s"] for r in log]
    precision = ctx.metrics["train"]["precision"]
    lengths = [len(e.input_ids) for e in ctx.data.splits["train"]]
    return finish(steps, seconds, [r["loss"] for r in log], "bf16" if precision == "bf16" else "fp32", ctx.model(), lengths)


def _meter_engine_batches(trainer_mod, meter: StepMeter) -> None:
    """Observe (never change) the micro-batches engine's trainer consumes."""
    original = trainer_mod.Batches

    class Metered(original):
        def stream(self, *a, **kw):
            for batch in super().stream(*a, **kw):
                meter.see(batch)
                yield batch

    trainer_mod.Batches = Metered


def run_trl_arm(overrides: list[str], sft_overrides: dict, run_dir: Path) -> dict:
    """TRL SFTTrainer + PEFT, as its docs show it, on engine's model, rows and LoRA config."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from engine.config import load
    from engine.data import prepare
    from engine.model import MODELS as MODEL_REGISTRY
    from engine.quantization import QUANTIZATIONS
    from engine.runtime import resolve_device

    cfg = load(overrides, str(CONF))
    torch.manual_seed(cfg.seed)
    model, tokenizer = MODEL_REGISTRY.build(cfg.model, quantization_config=QUANTIZATIONS.build(cfg.quantization), progress=False)
    data = prepare(cfg.data, tokenizer, seed=cfg.seed)
    rows = [{"prompt": ex.messages[:-1], "completion": ex.messages[-1:]} for ex in data.splits["train"]]
    ad = cfg.adapter
    lora = LoraConfig(
        r=ad.r,
        lora_alpha=ad.alpha,
        lora_dropout=ad.dropout,
        target_modules=list(ad.target_modules),
        bias=ad.bias,
        task_type="CAUSAL_LM",
    )
    device = resolve_device(cfg.device)
    sft = dict(
        output_dir=str(run_dir / "trl"),
        max_steps=cfg.train.max_steps,
        per_device_train_batch_size=cfg.train.micro_batch_size,
        gradient_accumulation_steps=cfg.train.grad_accum,
        learning_rate=cfg.train.lr,
        lr_scheduler_type=cfg.train.schedule,
        warmup_steps=cfg.train.warmup_steps,
        max_grad_norm=cfg.train.max_grad_norm,
        weight_decay=cfg.train.weight_decay,
        max_length=cfg.data.max_length,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=cfg.seed,
        use_cpu=device == "cpu",
        disable_tqdm=True,
    )
    sft.update(sft_overrides)
    if device == "cpu" and "bf16" not in sft_overrides:
        sft["bf16"] = True  # SFTConfig's own default; stated so it survives use_cpu
    args = SFTConfig(**sft)
    log_path = run_dir / "train_log.jsonl"
    meter = StepMeter()

    class Clock(TrainerCallback):
        def __init__(self):
            self.t0, self.seconds, self.losses = None, [], []

        def on_step_begin(self, *a, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **kw):
            self.seconds.append(time.perf_counter() - self.t0)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))
                with open(log_path, "a") as f:
                    f.write(json.dumps({"step": state.global_step, "loss": logs["loss"]}) + "\n")

    clock = Clock()
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=lora,
        callbacks=[clock],
    )
    collate = trainer.data_collator

    def metered(examples):
        batch = collate(examples)
        meter.see(batch)
        return batch

    trainer.data_collator = metered
    # The dataloader was not built yet (it is built in train()), so the wrapper is used.
    trainer.train()
    steps = meter.per_step(len(clock.seconds), args.gradient_accumulation_steps)
    lengths = [len(ex.input_ids) for ex in data.splits["train"]]
    precision = "bf16" if args.bf16 else "fp32"
    return finish(steps, clock.seconds, clock.losses, precision, trainer.model, lengths)


def random_phi2_dir(dest: Path) -> str:
    """Save a random-init model with phi-2's shapes (bf16) + a tokenizer, for engine and TRL alike."""
    if (dest / "config.json").is_file():
        return str(dest)
    import torch
    from transformers import AutoTokenizer, PhiConfig, PhiForCausalLM

    from engine.model import cache_root

    torch.manual_seed(0)
    model = PhiForCausalLM(PhiConfig(**{k: v for k, v in PHI2_CONFIG.items() if k not in ("architectures", "model_type")}))
    model.to(torch.bfloat16).save_pretrained(dest)
    # phi-2's own tokenizer is not available offline; SmolLM2's fits inside phi-2's 51,200 vocab.
    tok = AutoTokenizer.from_pretrained(cache_root() / "models" / "SmolLM2-135M-Instruct.Q4_1")
    tok.save_pretrained(dest)
    return str(dest)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
