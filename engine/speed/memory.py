"""Process memory tuning for CPU training: glibc heap thresholds and the huge-page heap.

Both are measured wins on CPU (bench/RESULTS.md) with off switches
(``train.keep_freed_memory=false``, ``ENGINE_HUGE_PAGES=0``).
"""

from __future__ import annotations

from collections.abc import Mapping


def keep_freed_memory() -> bool:
    """Let glibc reuse freed large blocks instead of unmapping them; True if it applied.

    Why: glibc serves blocks above its mmap threshold (dynamic, at most 32 MB) with fresh
    mmap'd pages and unmaps them on free, so every CPU training step page-faults its big
    tensors in again (the 49k-vocab logits alone are ~200 MB per 1k labelled tokens): ~100k
    faults per step, measured at 7-10% of a packed SmolLM2-135M LoRA step on this machine
    (bench/RESULTS.md). Raising the mmap and trim thresholds keeps freed blocks in the heap
    for the next step. The cost: the process's RSS stays at its peak instead of shrinking.
    Linux with glibc only; elsewhere (macOS, musl) nothing changes.
    """
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    # Trim threshold -1 means "never trim" (mallopt(3)). Any finite value is capped at 2 GiB
    # by mallopt's int argument, and a heap that peaks near 8 GB (packed SmolLM2 steps) frees
    # more than that at its top now and then: glibc handed ~2.4 GB back and the next step
    # faulted it in again (~440k faults, ~1.7 s every few steps, measured here).
    never = ctypes.c_int(-1)
    most = ctypes.c_int(2**31 - 1)
    return bool(mallopt(m_trim_threshold, never)) and bool(mallopt(m_mmap_threshold, most))


HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT = "ENGINE_HUGE_PAGES"


def huge_pages_env(environ: Mapping[str, str]) -> dict[str, str] | None:
    """The environment to restart ``python -m engine`` with so that glibc backs its heap with
    transparent huge pages, or None when that would change nothing.

    Why: a CPU training step allocates gigabytes of activations; in 4 KiB pages every fresh
    page is a fault that the kernel must zero (~3-4 µs each in this VM). glibc >= 2.35 can ask
    for 2 MiB pages for its heap (``glibc.malloc.hugetlb=1``): ~500x fewer faults and fewer TLB
    misses in the big GEMMs; measured +3% steady-state on a packed SmolLM2 LoRA run
    (bench/RESULTS.md). It is a start-up tunable only, so the CLI re-executes itself once
    with it (engine/__main__.py). Skipped when the kernel's THP mode is not ``madvise``
    (``always`` already covers the heap; ``never`` has none to give), off Linux/glibc, when
    already set, or when ``ENGINE_HUGE_PAGES=0``.
    """
    if environ.get(OPT_OUT, "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    tunables = environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" in tunables or not _glibc_at_least(2, 35) or _thp_mode() != "madvise":
        return None
    return {**environ, "GLIBC_TUNABLES": f"{tunables}:{HUGE_PAGES_TUNABLE}" if tunables else HUGE_PAGES_TUNABLE}


def _glibc_at_least(major: int, minor: int) -> bool:
    import os
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()  # "glibc 2.36"
        have = tuple(int(x) for x in version.split(".")[:2])
    except (AttributeError, OSError, ValueError):
        return False
    return name == "glibc" and have >= (major, minor)


def _thp_mode() -> str | None:
    """The bracketed mode of /sys/kernel/mm/transparent_hugepage/enabled, e.g. ``madvise``."""
    try:
        text = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else None
