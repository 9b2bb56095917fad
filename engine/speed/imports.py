"""Start faster: import transformers and peft without the packages this run never calls.

Why: ``import peft`` imports bitsandbytes whenever it is installed (which pulls
torch._inductor and scipy), and transformers' loss utilities import scipy for object-detection
losses. A LoRA run on an unquantized model uses neither, yet pays about 1.5 s of every start for
them (bench/RESULTS.md, "Startup"). Both libraries look for these packages with ``importlib.util.find_spec`` and
import them only where found, so while they are imported the packages are marked absent
(``sys.modules[name] = None``: find_spec answers None, ``import`` raises ImportError); then
the marks are removed and the libraries' cached "is it installed?" answers are cleared, so a
later use (a quantized run in the same process) finds the packages as usual.

A guest's privilege: afterwards it checks that every library again reports the hidden
packages as installed; where one does not, it says so in one line; where the build needs a
hidden package after all, it is built again with everything visible, with one line.
``ENGINE_LEAN_IMPORTS=0`` turns it off.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

NOT_NEEDED = ("scipy",)
"""Never used by a causal-LM run: transformers imports it for object-detection losses only. Its
cached "absent" answer is left as it is, so the process stays consistent with what transformers
defined at import. (Not ``kernels``: transformers turns its kernel hub on by default when the
package is there, and refuses models later if it was hidden at import.)"""
QUANTIZATION_ONLY = ("bitsandbytes",)
"""Used only when the run quantizes its base (``quantization`` not none)."""
LIBRARIES = ("transformers", "peft")
"""Whose first import (and first model build) the packages are hidden from."""

# The libraries' cached "is bitsandbytes installed?" answers, cleared once the marks are gone, so a
# later quantized build in this process (a test session, a sweep) finds it: (module, function).
CACHED_CHECKS = (
    ("transformers.utils.import_utils", "is_bitsandbytes_available"),
    ("peft.import_utils", "is_bnb_available"),
    ("peft.import_utils", "is_bnb_4bit_available"),
)
ASKED_AFTER = CACHED_CHECKS[:2]
"""The ones the self-check calls (peft's 4-bit check imports bitsandbytes to answer: never called here)."""
DECIDES_AT_IMPORT = ("transformers.integrations.bitsandbytes", "peft.tuners.lora.bnb")
"""Modules that import bitsandbytes only if it is there when they load: one loaded while it was
hidden is dropped from ``sys.modules``, so the next use loads it again with bitsandbytes seen."""


def lean_call(fn: Callable[[], T], *, quantized: bool) -> tuple[T, str | None]:
    """``fn()`` (the run's model build: the first import of transformers and peft, and peft's
    wrapping, which asks again whether bitsandbytes is installed) with the unused packages hidden.

    Returns fn's result and a one-line notice when it stepped aside (None when it applied, or had
    nothing to hide: the switch is off or everything was imported already).
    """
    names = NOT_NEEDED + (() if quantized else QUANTIZATION_ONLY)
    # Only around the libraries' first import: once transformers is loaded, its cached answers
    # already say "installed", and hiding a package then would break the import that follows.
    off = os.environ.get("ENGINE_LEAN_IMPORTS", "1") == "0" or any(m in sys.modules for m in LIBRARIES)
    hidden = [] if off else [n for n in names if n not in sys.modules and importlib.util.find_spec(n) is not None]
    if not hidden:
        return fn(), None
    for name in hidden:
        sys.modules[name] = None
    try:
        result = fn()
    except ImportError as e:
        _unhide(hidden)
        if (e.name or "").split(".")[0] not in hidden:
            raise
        return fn(), f"[engine] lean imports off: this build needs {e.name}, imported as usual"
    except BaseException:
        _unhide(hidden)
        raise
    _unhide(hidden)
    wrong = misreported(hidden)
    return result, (f"[engine] lean imports: {', '.join(wrong)} still reported missing after the build" if wrong else None)


def _unhide(hidden: list[str]) -> None:
    for name in hidden:
        if name in sys.modules and sys.modules[name] is None:
            del sys.modules[name]
    if set(hidden) & set(QUANTIZATION_ONLY):
        for module in DECIDES_AT_IMPORT:
            sys.modules.pop(module, None)
        for module, fn in CACHED_CHECKS:
            cached = getattr(sys.modules.get(module), fn, None)
            if hasattr(cached, "cache_clear"):
                cached.cache_clear()


def misreported(hidden: list[str]) -> list[str]:
    """``library: bitsandbytes`` for each availability check that now disagrees with what is installed."""
    if not set(hidden) & set(QUANTIZATION_ONLY):
        return []
    out = []
    for module, fn in ASKED_AFTER:
        check = getattr(sys.modules.get(module), fn, None)
        if check is None:
            continue
        try:
            ok = bool(check())
        except Exception:  # a version bound or a broken install: the library's own answer stands
            continue
        if not ok and _really_usable("bitsandbytes"):
            out.append(f"{module.split('.')[0]}: bitsandbytes")
    return out


def _really_usable(package: str) -> bool:
    try:
        importlib.import_module(package)
    except Exception:
        return False
    return True
