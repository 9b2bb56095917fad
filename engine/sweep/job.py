"""One job of a sweep: its record, a failure kept to itself, a finished job skipped on re-run.

Why a wrapper around the pipeline: Hydra's basic launcher re-raises a job's exception and the
whole multirun stops at the first failing combination, leaving no table. Here a job's error is
recorded in ``<job dir>/sweep_job.json`` (status ``failed`` with the error's first line) and the
sweep goes on; the entry point exits non-zero at the end when any job failed. A stop the user or
the scheduler asked for (Ctrl-C, SIGTERM: exit status >= 128) is recorded as ``interrupted`` and
*does* stop the sweep: re-running the same command with ``hydra.sweep.dir=<that dir>`` skips the
jobs recorded ``ok`` with the same overrides and resumes the others from their checkpoints.

``sweep_job.json`` is written at the start (``running``) and at the end of the job, atomically;
a job that was SIGKILLed keeps ``running`` with the PID and host of a process that is gone, which
is how ``engine.runs.status_of`` (the summary's and the runs page's status) tells ``interrupted`` from ``running``.
"""

from __future__ import annotations

import os
import re
import resource
import socket
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from engine.errors import ConfigError, UserError
from engine.files import write_json_atomic
from engine.runs import JOB_RECORD, METRICS, is_number, lookup, numeric_keys, read_job_record, read_metrics


class JobFailed(Exception):
    """A job's failure, raised for a sweeper that must be told a trial failed (Optuna: a NaN value
    would end its study); the error is in sweep_job.json and the summary already."""


def finished_before(job_dir: Path, overrides: list[str]) -> dict | None:
    """The record of an earlier ``ok`` run of exactly these overrides in this dir, else None.

    The overrides must match: a re-run whose grid changed puts other values under the same job
    number, and those must run.
    """
    record = read_job_record(job_dir)
    if record and record.get("status") == "ok" and record.get("overrides") == list(overrides):
        if (Path(job_dir) / METRICS).is_file():
            return record
    return None


def run_job(
    job_dir: Path, overrides: list[str], *, objective: str | None, work: Callable[[], Any], raise_failure: bool = False
) -> float | None:
    """Run ``work`` as sweep job ``job_dir``; returns the objective's value (NaN when the job failed).

    Args:
        job_dir: the job's run dir (Hydra's output dir for this job).
        overrides: the job's task overrides as Hydra recorded them (``.hydra/overrides.yaml``).
        objective: a dotted metrics.json key whose value goes back to Hydra's sweeper, or None.
        work: runs the job (the pipeline) in ``job_dir``; raises on failure.
        raise_failure: raise ``JobFailed`` for a failed job instead of returning NaN (Optuna's
            sweeper records an exception as a failed trial, and its ``max_failure_rate`` decides
            whether the study goes on; a NaN it cannot record at all).
    """
    job_dir = Path(job_dir)
    name = job_dir.name
    before = finished_before(job_dir, overrides)
    if before is not None:
        print(f"[engine] sweep job {name}: finished in an earlier run of this sweep (ok), not run again", flush=True)
        return _value_or_nan(job_dir, objective)
    earlier = read_job_record(job_dir)
    record: dict[str, Any] = {
        "status": "running",
        "overrides": list(overrides),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": time.time(),
        "attempt": int(earlier.get("attempt", 0)) + 1 if earlier else 1,
    }
    if earlier:
        record["previous_status"] = earlier.get("status")
    _write(job_dir, record)
    reset_peak_memory()
    t0 = time.perf_counter()
    try:
        work()
        value = objective_value(read_metrics(job_dir), objective) if objective else None
    except BaseException as e:
        status = "interrupted" if _is_stop(e) else "failed"
        _finish(job_dir, record, t0, status=status, error=first_line(e))
        if status == "interrupted":
            raise
        if not isinstance(e, UserError | SystemExit):
            traceback.print_exc()
        sys.stderr.write(f"engine: sweep job {name} failed: {first_line(e)} (the other jobs go on)\n")
        sys.stderr.flush()
        if raise_failure:
            raise JobFailed(first_line(e)) from None
        return float("nan")
    _finish(job_dir, record, t0, status="ok", objective=value)
    return value


def _finish(job_dir: Path, record: dict, t0: float, **fields) -> None:
    record.update(fields, finished=time.time(), wall_s=round(time.perf_counter() - t0, 2), **peak_memory())
    _write(job_dir, record)


def _write(job_dir: Path, record: dict) -> None:
    """Rank 0 keeps the record: under ``accelerate launch`` every rank runs the same jobs together."""
    if os.environ.get("RANK", "0") == "0":
        write_json_atomic(job_dir / JOB_RECORD, record)


def _is_stop(e: BaseException) -> bool:
    """Ctrl-C or a signal (SIGTERM: engine exits 128 + signal): the user or scheduler wants the sweep to stop."""
    if isinstance(e, KeyboardInterrupt):
        return True
    code = e.code if isinstance(e, SystemExit) else getattr(e, "exit_code", 0)
    return isinstance(code, int) and code >= 128


def first_line(e: BaseException) -> str:
    """The error as one line: a config error's first problem, else ``Type: first line``."""
    if isinstance(e, ConfigError) and e.problems:
        return e.problems[0].splitlines()[0]
    if isinstance(e, SystemExit):
        return f"exited with status {e.code}"
    text = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
    if isinstance(e, UserError):
        return text or type(e).__name__
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _value_or_nan(job_dir: Path, objective: str | None) -> float | None:
    if not objective:
        return None
    try:
        return objective_value(read_metrics(job_dir), objective)
    except UserError:
        return float("nan")  # recorded ok before, but without this objective: a new objective on re-run


def objective_value(metrics: dict, key: str) -> float:
    """The objective as a float; a key the run did not write is the user's to fix, so say which exist."""
    value = lookup(metrics, key)
    if is_number(value):
        return float(value)
    have = numeric_keys(metrics)
    near = [k for k in have if k.split(".")[0] == key.split(".")[0]] or have
    shown = ", ".join(near[:12]) + (", ..." if len(near) > 12 else "")
    what = "is not a number" if value is not None else "is not in this job's metrics.json"
    raise UserError(f"sweep.objective: '{key}' {what}; numeric keys there: {shown or 'none'}")


# ---------------------------------------------------------------- peak memory of one job


def reset_peak_memory() -> None:
    """Start this job's peak-memory count from now: jobs of the basic launcher share one process.

    Linux resets the process's peak RSS (VmHWM) when "5" is written to /proc/self/clear_refs; CUDA
    has its own counter. Elsewhere the peak stays the process's (the record says which).
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_memory() -> dict:
    """Peak resident memory (MiB) since ``reset_peak_memory``, and peak CUDA memory where used."""
    out: dict[str, Any] = {}
    try:
        m = re.search(r"VmHWM:\s+(\d+)\s+kB", Path("/proc/self/status").read_text())
        out["peak_rss_mb"] = round(int(m.group(1)) / 1024, 1) if m else None
    except OSError:
        scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
        out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20, 1)
        out["peak_rss_scope"] = "process"
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        out["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out
