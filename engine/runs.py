"""A run dir read back: its status in one vocabulary, and its metrics by dotted key.

Why one module: the runs page (engine/serve/ui.py), the sweep summary and job wrapper
(engine/sweep/) and the training loggers all read finished (or half-finished, or killed) run
dirs. Each used to decide "is this run done?" and walk ``metrics.json`` on its own, with
different words for the same state. This is the one place; it sits just above engine.files
and engine.lock so that every layer can read a run dir the same way.

The status of a run dir, in this vocabulary (``STATUSES``), first that applies:

- a sweep job's record (``sweep_job.json``) says ``ok``, ``failed`` (with the error's first
  line) or ``interrupted``: as recorded;
- recorded ``running``: ``running`` while that process is alive (or on another host: not
  checkable from here), else ``interrupted`` (SIGKILL, a node lost);
- no record, but the run dir's lock file still names a holder: ``running`` or ``interrupted``
  the same way;
- else from ``metrics.json`` against the stages ``config.yaml`` plans: ``ok`` when every
  planned stage wrote its metrics (or no plan is readable and some metrics are there),
  ``incomplete`` when some did, ``not started`` when none did.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from engine.files import read_json_record
from engine.lock import holder_pid

STATUSES = ("ok", "failed", "interrupted", "running", "incomplete", "not started")
"""Every status a run dir can have, best first (the runs page and the sweep summary show these)."""

JOB_RECORD = "sweep_job.json"
"""A sweep job's record in its run dir: status, error, wall time, peak memory (engine/sweep/job.py)."""

METRICS = "metrics.json"
TRAIN_LOG = "train_log.jsonl"
"""One JSON record per logged optimizer step (loss, lr, tokens ...; GRPO adds its rewards)."""

GONE = "its process is gone (killed or crashed)"


# ---------------------------------------------------------------- metrics.json by dotted key


def read_log(path: Path) -> list[dict]:
    """The records of a train_log.jsonl (none when it does not exist)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_metrics(run_dir: Path) -> dict:
    """A run dir's metrics.json, nested by stage; {} when missing or unreadable."""
    return read_json_record(Path(run_dir) / METRICS)


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """Every leaf of a nested dict by its dotted key, in file order (``evaluate.test.token_f1``).

    A leaf is anything but a non-empty dict (an empty dict is a leaf: its key exists). Used for
    metrics.json and for configs alike; a node that is not a dict has no keys.
    """
    if not isinstance(node, dict):
        return {}
    out: dict[str, Any] = {}
    for k, v in node.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def lookup(metrics: Any, key: str) -> Any:
    """The value at a dotted key of metrics.json (``evaluate.test.token_f1``), or None."""
    node: Any = metrics
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def is_number(value: Any) -> bool:
    """A metric value: an int or float, not a bool (``true`` in metrics.json is a flag, not 1)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def numeric_keys(metrics: dict) -> list[str]:
    """Every dotted key of a number in metrics.json, in file order."""
    return [k for k, v in flatten(metrics).items() if is_number(v)]


# ---------------------------------------------------------------- status


def read_job_record(run_dir: Path) -> dict | None:
    """A sweep job's ``sweep_job.json``, or None when there is none (or it is unreadable)."""
    try:
        record = json.loads((Path(run_dir) / JOB_RECORD).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def status_of(run_dir: Path, record: dict | None = None, metrics: dict | None = None) -> tuple[str, str]:
    """(status, why) of a run dir: one of ``STATUSES`` and, where it says more, the error's first
    line or why a run counts as interrupted (see the module docstring).

    ``record`` and ``metrics`` default to what the run dir holds (pass them when already read).
    A recorded status outside the vocabulary is not believed: the dir's files decide instead.
    """
    run_dir = Path(run_dir)
    record = read_job_record(run_dir) if record is None else record
    metrics = read_metrics(run_dir) if metrics is None else metrics
    recorded = record.get("status", "running") if record else None
    if recorded == "running":
        host = record.get("host")
        if host and host != socket.gethostname():
            return "running", f"(on {host}: cannot check from here)"
        return ("running", "") if alive(record.get("pid")) else ("interrupted", GONE)
    if recorded in STATUSES:
        return recorded, record.get("error", "")
    holder = holder_pid(run_dir)
    if holder is not None:
        return ("running", "") if alive(holder) else ("interrupted", GONE)
    config = read_yaml(run_dir / "config.yaml")
    stages = config.get("stages") if isinstance(config, dict) else None
    if metrics and (not isinstance(stages, list) or all(s in metrics for s in stages)):
        return "ok", ""
    return ("incomplete", "not every stage wrote its metrics") if metrics else ("not started", "")


def overall(statuses: Iterable[str]) -> str:
    """One status for a group of runs (a sweep's jobs): ``ok`` when every one is, ``running``
    while any runs, else the first of ``failed``, ``interrupted`` that any has, else ``incomplete``."""
    seen = set(statuses)
    if not seen:
        return "not started"
    if seen == {"ok"}:
        return "ok"
    return next((s for s in ("running", "failed", "interrupted") if s in seen), "incomplete")


def alive(pid: Any) -> bool:
    """Whether a process with this PID is running (a zombie counts as gone)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (killed, not yet reaped by its parent) is gone for our purposes
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def read_yaml(path: Path) -> Any:
    """A YAML file a run wrote (config.yaml, Hydra's records), or None when missing or unreadable."""
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None
