"""engine.runtime.keep_freed_memory: big freed blocks are reused, not faulted in again."""

from __future__ import annotations

import resource
import sys

import pytest
import torch

from engine.runtime import keep_freed_memory


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux-only")
def test_big_blocks_are_reused_without_page_faults():
    if not keep_freed_memory():
        pytest.skip("this libc has no mallopt (not glibc)")
    n = 2**24  # 64 MB of float32: far above glibc's default mmap threshold
    torch.empty(n).fill_(1.0)  # first use maps the pages once
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        torch.empty(n).fill_(1.0)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    # Without the setting each allocation would be a fresh mmap: ~16k faults (64 MB / 4 KiB) each.
    assert faults < n * 4 // 4096 // 4, faults
