"""The layout is a checked contract, not a convention.

1. Layers import downward only: import-linter's layers contract in pyproject.toml
   (function-level imports count), run here so a violation fails the suite.
2. No import cycle among engine's modules at all, within a layer included.
"""

from __future__ import annotations

import subprocess
import sys

from conftest import ROOT


def test_layers_contract_holds():
    proc = subprocess.run(
        [sys.executable, "-c", "from importlinter.cli import lint_imports_command; lint_imports_command()"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout


def _cycles(graph) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for root in sorted(graph.modules):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.find_modules_directly_imported_by(root))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.find_modules_directly_imported_by(child)))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    comp.append(m)
                    if m == node:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_no_import_cycles_among_engine_modules():
    import grimp

    graph = grimp.build_graph("engine", exclude_type_checking_imports=True)
    assert _cycles(graph) == []


def _function_level_engine_imports(path) -> list[str]:
    """``file:line`` of each import of an ``engine`` module inside a function body of ``path``."""
    import ast

    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for fn in ast.walk(tree):
        if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            continue
        for node in ast.walk(fn):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""] if node.level == 0 else ["engine (relative)"]
            else:
                continue
            if any(n == "engine" or n.startswith("engine.") or n.startswith("engine (") for n in names):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return sorted(set(found))


def test_stages_have_no_function_level_engine_imports():
    """A stage's dependencies on engine's packages show at the top of its file; stage modules import no other
    stage module (only engine.stages.registry): what a stage needs from another is a declared trait."""
    stages = sorted((ROOT / "engine" / "stages").glob("*.py"))
    inside = [hit for path in stages for hit in _function_level_engine_imports(path)]
    assert inside == [], "function-level engine imports in engine/stages/:\n" + "\n".join(inside)
    import ast

    crossing = []
    for path in stages:
        for node in ast.walk(ast.parse(path.read_text())):
            module = node.module if isinstance(node, ast.ImportFrom) else None
            if module and module.startswith("engine.stages.") and module != "engine.stages.registry":
                if path.name != "__init__.py":
                    crossing.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {module}")
    assert crossing == [], "stage modules importing other stages:\n" + "\n".join(crossing)


def test_importing_the_stages_loads_no_torch():
    """Validation imports engine.stages (the registry and its traits): that must stay fast and torch-free,
    so the heavy libraries are imported inside the package functions that use them."""
    heavy = ("torch", "transformers", "peft", "faiss", "matplotlib", "scipy", "llama_cpp")
    code = f"import sys, engine.stages; print(sorted(m for m in {heavy!r} if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]", f"import engine.stages loaded {proc.stdout.strip()}"
