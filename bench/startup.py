"""How long engine takes to answer, and to reach the first training step (issue 27's targets).

    python bench/startup.py                   # medians of 5, this checkout's engine
    python bench/startup.py --reps 3 --json bench/results/startup.json

Each case is a fresh process, as a user types it:

- ``--help``, ``--cfg job`` and a config error (``train.lr=abc``): wall time, and whether torch
  was imported on the way (``-X importtime`` in one extra run per case: the list of heavy
  packages that got imported);
- ``model=tiny 'stages=[prepare_data,train]' train.max_steps=1``: wall time from the command to
  the first finished training step (the first ``train: ... 1/1`` progress update on stderr) and
  to the process's exit.

Why whole commands: what a user waits for includes the interpreter, the huge-page re-execution
and every import, which a profile of one function hides. Run on a quiet machine: two cores
shared with another job make every number here 2-5x slower.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HEAVY = ("torch", "transformers", "peft", "bitsandbytes", "scipy", "matplotlib", "accelerate", "datasets")
FIRST_STEP = re.compile(rb"train:[^\r\n]*\b1/\d")

CASES = {
    "help": ["--help"],
    "cfg_job": ["--cfg", "job"],
    "config_error": ["train.lr=abc"],
}


def engine_cmd(args: list[str], importtime: bool = False) -> list[str]:
    return [sys.executable, *(["-X", "importtime"] if importtime else []), "-m", "engine", *args]


def quick(args: list[str]) -> tuple[float, int]:
    t0 = time.perf_counter()
    done = subprocess.run(engine_cmd(args), capture_output=True, env=_env())
    return time.perf_counter() - t0, done.returncode


def heavy_imports(args: list[str]) -> list[str]:
    """The heavy top-level packages this command imported (from ``-X importtime``)."""
    done = subprocess.run(engine_cmd(args, importtime=True), capture_output=True, text=True, env=_env())
    found = set()
    for line in done.stderr.splitlines():
        if not line.startswith("import time:"):
            continue
        name = line.rsplit("|", 1)[-1].strip()
        if name in HEAVY:
            found.add(name)
    return sorted(found)


def first_step(workdir: Path) -> tuple[float | None, float, int]:
    """(seconds to the first finished step, seconds to exit, exit status) of a 1-step tiny run."""
    run_dir = workdir / f"run-{time.time_ns()}"
    args = ["model=tiny", "stages=[prepare_data,train]", "train.max_steps=1", f"hydra.run.dir={run_dir}"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(engine_cmd(args), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_env())
    seen, buf = None, b""
    while chunk := proc.stderr.read1(4096):
        buf = (buf + chunk)[-4096:]
        if seen is None and FIRST_STEP.search(buf):
            seen = time.perf_counter() - t0
    code = proc.wait()
    return seen, time.perf_counter() - t0, code


def _env() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.pop("HYDRA_FULL_ERROR", None)
    return env


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = ap.parse_args(argv)
    out: dict = {"python": sys.version.split()[0], "reps": args.reps, "cases": {}}
    for name, case in CASES.items():
        runs = [quick(case) for _ in range(args.reps)]
        out["cases"][name] = {
            "median_s": round(statistics.median(t for t, _ in runs), 3),
            "runs_s": [round(t, 3) for t, _ in runs],
            "exit": sorted({c for _, c in runs}),
            "heavy_imports": heavy_imports(case),
        }
        print(name, json.dumps(out["cases"][name]), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        runs = [first_step(Path(tmp)) for _ in range(args.reps)]
    steps = [s for s, _, _ in runs if s is not None]
    out["cases"]["tiny_first_step"] = {
        "median_first_step_s": round(statistics.median(steps), 3) if steps else None,
        "median_exit_s": round(statistics.median(e for _, e, _ in runs), 3),
        "first_step_s": [None if s is None else round(s, 3) for s, _, _ in runs],
        "exit": sorted({c for _, _, c in runs}),
    }
    print("tiny_first_step", json.dumps(out["cases"]["tiny_first_step"]), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
