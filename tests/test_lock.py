"""One process per run dir: a second one exits 2 naming the holder; a killed holder blocks nothing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, TINY, run_engine

# A stage that holds the run (and its lock) until the test says go: no timing guesswork.
HOLD = """
import time
from pathlib import Path
from engine.stages import STAGES


@STAGES.register("hold")
def hold(ctx):
    (ctx.run_dir / "holding").write_text("yes")
    while not (ctx.run_dir / "go").exists():
        time.sleep(0.1)
    return {}
"""

ARGS = [*TINY, "train.max_steps=3", "device=cpu", "precision=fp32", "plugins=[hold_stage]"]


@pytest.fixture
def holder(tmp_path):
    """Start ``python -m engine`` that stops in the ``hold`` stage, then trains 3 steps."""
    (tmp_path / "hold_stage.py").write_text(HOLD)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore", "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "engine", *ARGS, "stages=[hold,prepare_data,train]", f"hydra.run.dir={run_dir}"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while not (run_dir / "holding").exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, "the first run never reached its hold stage"
        time.sleep(0.2)
    yield proc, run_dir, env
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


def test_second_process_on_a_run_dir_exits_2_with_the_holders_pid(holder):
    first, run_dir, env = holder
    second = run_engine(*ARGS, "stages=[prepare_data,train]", f"hydra.run.dir={run_dir}", cwd=run_dir.parent)
    assert second.returncode == 2, second.stderr[-3000:]
    assert f"run dir {run_dir} is in use by process {first.pid}" in second.stderr
    assert "choose another hydra.run.dir" in second.stderr
    assert "Traceback" not in second.stderr + second.stdout

    (run_dir / "go").write_text("")
    out, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-3000:]
    assert "finished" in out
    assert len((run_dir / "train_log.jsonl").read_text().splitlines()) == 3
    assert (run_dir / ".hydra" / "overrides.yaml").read_text().count("stages=[hold,prepare_data,train]") == 1
    assert (run_dir / ".lock").read_text() == ""  # released cleanly


@pytest.mark.slow
def test_a_killed_holder_leaves_no_lock_and_is_reported(holder):
    first, run_dir, env = holder
    first.send_signal(signal.SIGKILL)
    first.communicate()
    again = run_engine(*ARGS, "stages=[prepare_data,train]", f"hydra.run.dir={run_dir}", cwd=run_dir.parent)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"was held by process {first.pid}" in again.stdout and "ended without releasing it" in again.stdout


def test_lock_is_reentrant_in_one_process_and_released(tmp_path):
    from engine.lock import acquire, holding, release

    run_dir = tmp_path / "run"
    with holding(run_dir):
        assert acquire(run_dir) is False  # already ours
        assert (run_dir / ".lock").read_text().split()[0] == str(os.getpid())
    assert (run_dir / ".lock").read_text() == ""
    with holding(tmp_path / "rank1", enabled=False):  # non-main ranks of a launch do not lock
        pass
    assert not (tmp_path / "rank1").exists()
    assert acquire(run_dir) is True
    release(run_dir)


def test_another_process_is_refused_while_held(tmp_path):
    from engine.lock import RunDirInUse, acquire, release

    run_dir = tmp_path / "run"
    code = f"from engine.lock import acquire; import time; acquire({str(run_dir)!r}); print('locked', flush=True); time.sleep(60)"
    other = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert other.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirInUse, match=rf"in use by process {other.pid}, started "):
            acquire(run_dir)
        assert RunDirInUse.exit_code == 2
    finally:
        other.kill()
        other.wait()
    assert acquire(Path(run_dir)) is True  # the kernel released the dead holder's lock
    release(run_dir)
