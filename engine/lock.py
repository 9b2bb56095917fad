"""One process per run dir: an exclusive ``flock`` on ``run_dir/.lock`` for the whole run.

Why: two processes on the same ``hydra.run.dir`` interleave checkpoints, overwrite each
other's config.yaml and .hydra/ record, and one of them dies half-way with a traceback.
``flock`` is released by the kernel when the holder exits, however it exits (SIGKILL
included), so a crashed run never leaves a lock that blocks the next one. The file keeps the
holder's PID, start time and command line, for the message the second process prints and to
say when a run dir was left by a process that is gone. Under ``accelerate launch`` only the
main process locks (the ranks of one run share its dir by design).
"""

from __future__ import annotations

import atexit
import fcntl
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from engine.errors import UserError

LOCK_NAME = ".lock"


class RunDirInUse(UserError):
    """Another live process holds the run dir (exit 2: the command line chose that dir)."""

    exit_code = 2


# Run dir (resolved) -> open lock file, for every run dir this process holds.
_HELD: dict[Path, object] = {}


def acquire(run_dir: Path) -> bool:
    """Lock ``run_dir`` (creating it) for this process; False if this process already held it.

    Raises RunDirInUse (exit 2) naming the holder when another live process has it.
    """
    run_dir = Path(run_dir).resolve()
    if run_dir in _HELD:
        return False
    run_dir.mkdir(parents=True, exist_ok=True)
    f = open(run_dir / LOCK_NAME, "a+")  # held open for the whole run
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip()
        f.close()
        raise RunDirInUse(in_use_message(run_dir, holder)) from None
    f.seek(0)
    previous = f.read().strip()
    if previous:  # a clean exit empties the file: this holder was killed or crashed
        print(f"[engine] {run_dir} was held by {_describe(previous)}, which ended without releasing it; taking over", flush=True)
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n{time.strftime('%Y-%m-%d %H:%M:%S')}\n{' '.join(sys.orig_argv)}\n")
    f.flush()
    _HELD[run_dir] = f
    return True


def release(run_dir: Path) -> None:
    """Unlock and empty the file (it stays: deleting a lock file races with a process about to
    lock it); a file that still names a holder was left by a process that did not exit cleanly."""
    f = _HELD.pop(Path(run_dir).resolve(), None)
    if f is not None:
        f.truncate(0)
        f.close()  # closing the descriptor releases the flock


@atexit.register
def _release_all() -> None:
    for run_dir in list(_HELD):
        release(run_dir)


@contextmanager
def holding(run_dir: Path, enabled: bool = True):
    """Hold the run dir's lock inside the block; one taken earlier by this process (the CLI
    locks before Hydra writes anything) stays held until the process exits."""
    took = enabled and acquire(run_dir)
    try:
        yield
    finally:
        if took:
            release(run_dir)


def holder_pid(run_dir: Path) -> int | None:
    """The PID the run dir's lock file names (its first line; a clean exit empties the file), or None."""
    try:
        first = (Path(run_dir) / LOCK_NAME).read_text().split("\n", 1)[0].strip()
    except OSError:
        return None
    return int(first) if first.isdigit() else None


def in_use_message(run_dir: Path, holder: str) -> str:
    who = _describe(holder) if holder else "another process"
    return f"hydra.run.dir: run dir {run_dir} is in use by {who}; wait for it to finish or choose another hydra.run.dir"


def _describe(holder: str) -> str:
    lines = holder.splitlines()
    pid = lines[0] if lines else "?"
    started = f", started {lines[1]}" if len(lines) > 1 else ""
    command = f": `{lines[2]}`" if len(lines) > 2 and lines[2] else ""
    return f"process {pid}{started}{command}"
