"""engine.speed.memory.keep_freed_memory: a training-step-like allocation pattern stops page-faulting."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# One "step": activations of a few sizes kept alive together (a 2048-token SmolLM2 step has
# [2048, 576] and [2048, 1536] tensors and ~200 MB of logits), then all freed. Prints the
# minor page faults of the last of four steps.
STEP = """
import resource, sys, torch
from engine.speed.memory import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    before = faults()
    live = [torch.empty(2048, 576).fill_(1) for _ in range(12)]
    live += [torch.empty(2048, 1536).fill_(1) for _ in range(6)]
    live.append(torch.empty(1024, 49152).fill_(1))
    del live
print(faults() - before)
"""


def _last_step_faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", STEP, mode], capture_output=True, text=True, timeout=120, check=True)
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux-only")
def test_a_step_reuses_freed_memory_instead_of_faulting_it_in():
    kept = _last_step_faults("keep")
    default = _last_step_faults("default")
    # Default glibc: the ~200 MB block is a fresh mmap every step (~49k faults of 4 KiB alone).
    assert default > 40_000, default
    assert kept < default / 10, (kept, default)


# --------------------------------------------------------------- huge-page heap relaunch


def test_huge_pages_env_adds_the_tunable_once_and_respects_opt_out(monkeypatch):
    from engine.speed import memory as runtime

    monkeypatch.setattr(runtime, "_glibc_at_least", lambda *v: True)
    monkeypatch.setattr(runtime, "_thp_mode", lambda: "madvise")
    env = runtime.huge_pages_env({"PATH": "/bin"})
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    # Other tunables are kept; a second pass (the relaunched process) changes nothing.
    env = runtime.huge_pages_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    assert runtime.huge_pages_env(env) is None
    assert runtime.huge_pages_env({"ENGINE_HUGE_PAGES": "0"}) is None
    # Nothing to gain: THP off or already on for every mapping, or no new enough glibc.
    for mode in ("never", "always", None):
        monkeypatch.setattr(runtime, "_thp_mode", lambda mode=mode: mode)
        assert runtime.huge_pages_env({}) is None
    monkeypatch.setattr(runtime, "_thp_mode", lambda: "madvise")
    monkeypatch.setattr(runtime, "_glibc_at_least", lambda *v: False)
    assert runtime.huge_pages_env({}) is None


RELAUNCH = """
import os, sys
from engine.__main__ import relaunch_with_huge_pages
print("pid", os.getpid(), "argv", sys.argv[1:], "tunables", os.environ.get("GLIBC_TUNABLES"), flush=True)
relaunch_with_huge_pages()
"""


def test_relaunch_reexecutes_the_same_command_once_with_the_tunable():
    from engine.speed.memory import _glibc_at_least, _thp_mode

    if not (_glibc_at_least(2, 35) and _thp_mode() == "madvise"):
        pytest.skip("needs glibc >= 2.35 and THP in madvise mode")
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "ENGINE_HUGE_PAGES")}
    out = subprocess.run(
        [sys.executable, "-c", RELAUNCH, "a=1"], env=env, capture_output=True, text=True, timeout=120, check=True
    )
    lines = out.stdout.splitlines()
    assert len(lines) == 2, out.stdout  # the original run, then exactly one re-execution
    assert "argv ['a=1'] tunables None" in lines[0]
    assert "argv ['a=1'] tunables glibc.malloc.hugetlb=1" in lines[1]
    assert lines[0].split()[1] == lines[1].split()[1]  # exec, not a child: same process

    off = subprocess.run(
        [sys.executable, "-c", RELAUNCH],
        env={**env, "ENGINE_HUGE_PAGES": "0"},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert len(off.stdout.splitlines()) == 1
