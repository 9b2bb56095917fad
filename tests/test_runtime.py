"""engine.runtime.keep_freed_memory: a training-step-like allocation pattern stops page-faulting."""

from __future__ import annotations

import subprocess
import sys

import pytest

# One "step": activations of a few sizes kept alive together (a 2048-token SmolLM2 step has
# [2048, 576] and [2048, 1536] tensors and ~200 MB of logits), then all freed. Prints the
# minor page faults of the last of four steps.
STEP = """
import resource, sys, torch
from engine.runtime import keep_freed_memory
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
