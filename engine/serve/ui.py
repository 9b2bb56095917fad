"""The web playground: one static page on the server's own routes, and a read-only runs API.

Why plain HTML/CSS/JS and not Gradio: the page is one small file set under engine's routes,
works fully offline (no CDN, system fonts, no build step), and talks to exactly the public
API users get (``/v1/models``, ``/v1/chat/completions``, ``/lora-adapters``): what works in
the page works with curl and the ``openai`` client.

Routes:
  GET /                      the page (also at /ui)
  GET /ui/static/<name>      its script and style sheet (only the files shipped in static/)
  GET /ui/runs               run dirs under outputs/: recipe, time, status, key metrics, files
  GET /ui/runs/<run>/<file>  report.html, loss.png, plots/*.png, sweep_summary.* of one run

Why the page itself needs no key: a browser opening ``/`` cannot send a Bearer header, and
the page holds no data; it asks for the key when a call answers 401 and sends it on every
call after. Everything with data (the runs API included) takes the app's key dependency.

Why the runs API is fenced so tightly: it reads the file system on behalf of the network.
A run id is only ever looked up in a fresh listing of the outputs dir (never joined to a
path as given), a file name must be one of a few report kinds, and every path is resolved
(symlinks followed) and must stay inside the outputs dir: a symlinked run dir leading out is
not listed (the listing says how many were left out). Answers carry names relative to the
outputs dir and numbers, never a local path; errors are OpenAI-shaped like the rest.
"""

from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, RedirectResponse

from engine.runs import flatten, lookup, overall, read_metrics, status_of
from engine.serve.openai import ApiError
from engine.sweep.summary import recorded_statuses

STATIC = Path(__file__).parent / "static"

PAGE_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; "
    "frame-src 'self' blob:; connect-src 'self'; object-src 'none'; base-uri 'self'; frame-ancestors 'none'"
)
"""The page runs only its own script and talks only to this server. Inline styles and a
same-origin ``<base>`` are allowed for a run's HTML files, which the page shows in a sandboxed
iframe (the iframe inherits this policy; its base makes a summary's relative plot links work)."""

FILE_CSP = "sandbox; default-src 'none'; img-src 'self' data:; style-src 'unsafe-inline'"
"""A run's files are shown as documents, never run: no script, no requests, an opaque origin."""

RUN_FILES = re.compile(
    r"report\.html|loss\.png|plots/[A-Za-z0-9_.-]+\.png|sweep_summary\.(?:html|md|csv|json)|sweep_[A-Za-z0-9_.-]+\.png"
)
"""The file kinds a run shares: its report, loss plot and plots, a sweep's summary and plots.
Not metrics.json or config.yaml: they hold local paths (adapter dirs, data files)."""

MEDIA = {
    ".html": "text/html; charset=utf-8",
    ".png": "image/png",
    ".md": "text/markdown; charset=utf-8",
    ".csv": "text/csv; charset=utf-8",
    ".json": "application/json",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
}

MAX_DEPTH = 4
"""outputs/<recipe>/<time>, outputs/<recipe>/multirun_<time>/<job>: deeper dirs are no runs."""
MAX_DIRS = 5000
"""Directories looked at per listing: a huge outputs dir slows the listing, never the server."""
SKIP = {"adapter", "checkpoints", "plots", "export", "merged", "lm_eval_tasks", "__pycache__", "data"}
"""Folders inside a run that never hold another run."""
_STAMP = re.compile(r"(\d{4}-\d{2}-\d{2})_(\d{2})-(\d{2})-(\d{2})")
_RECIPE = re.compile(r"^recipe:\s*['\"]?([A-Za-z0-9_.-]+)", re.M)


def ui_router(outputs_dir: Path | str | None, *, dependencies: Sequence = ()) -> APIRouter:
    """The page, its static files and the runs API.

    Args:
        outputs_dir: the folder holding run dirs (Hydra's ``outputs/``); None: the runs view
            is empty and says so.
        dependencies: FastAPI dependencies for the runs API: the app's API-key check.
    """
    router = APIRouter()
    runs = RunsIndex(Path(outputs_dir) if outputs_dir is not None else None)
    shipped = {p.name: p for p in STATIC.iterdir() if p.is_file()} if STATIC.is_dir() else {}
    page_headers = {"Content-Security-Policy": PAGE_CSP, "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}

    @router.get("/", include_in_schema=False)
    async def page():
        if "index.html" not in shipped:
            raise ApiError(404, "The playground's files are not installed with this engine.", code="ui_missing")
        return FileResponse(shipped["index.html"], media_type=MEDIA[".html"], headers=page_headers)

    @router.get("/ui", include_in_schema=False)
    async def page_alias():
        return RedirectResponse("/", status_code=307)

    @router.get("/ui/static/{name}", include_in_schema=False)
    async def static(name: str):
        path = shipped.get(name)
        if path is None or path.suffix not in MEDIA:
            raise ApiError(404, f"No static file '{name[:80]}'; the page ships {', '.join(sorted(shipped))}.", code="not_found")
        return FileResponse(path, media_type=MEDIA[path.suffix], headers=page_headers)

    # Plain functions, not coroutines: FastAPI runs them in its thread pool, so walking the
    # outputs dir never holds up the event loop (and the streams it serves).
    @router.get("/ui/runs", dependencies=list(dependencies))
    def list_runs():
        listing = runs.scan()
        return {
            "object": "list",
            "outputs": runs.root.name if runs.root is not None else None,
            "data": [r.public() for r in listing.runs],
            "skipped": listing.skipped,
        }

    @router.get("/ui/runs/{rest:path}", dependencies=list(dependencies))
    def run_file(rest: str):
        path, name = runs.file(rest)
        headers = {"Content-Security-Policy": FILE_CSP, "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}
        return FileResponse(path, media_type=MEDIA[Path(name).suffix], headers=headers)

    return router


@dataclass
class Run:
    """One run dir (or sweep dir) as the runs view shows it."""

    id: str
    """Its path relative to the outputs dir, with ``/``: the only name the API takes back."""
    kind: str
    """``run`` or ``sweep`` (a multirun dir: its summary; its jobs are runs of their own)."""
    recipe: str | None
    time: str
    """``YYYY-MM-DD HH:MM:SS`` from the dir name Hydra gives it, else the dir's mtime."""
    status: str
    """A run's ``engine.runs.status_of`` (``ok``, ``failed``, ``interrupted``, ``running``, ``incomplete``,
    ``not started``: the sweep summary's words); a sweep's, its jobs' ``engine.runs.overall``."""
    stages: list[str] = field(default_factory=list)
    metrics: list[dict] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    sweep: str | None = None
    """The sweep this run is a job of."""
    dir: Path | None = None

    def public(self) -> dict:
        return {
            "id": self.id,
            "kind": self.kind,
            "recipe": self.recipe,
            "time": self.time,
            "status": self.status,
            "stages": self.stages,
            "metrics": self.metrics,
            "files": self.files,
            "sweep": self.sweep,
        }


@dataclass
class Listing:
    runs: list[Run]
    skipped: int
    """Entries not listed because they lead outside the outputs dir (symlinks)."""


class RunsIndex:
    """The outputs dir, listed fresh on every call (runs appear and finish while serving)."""

    def __init__(self, root: Path | None):
        self.root = root.expanduser().resolve() if root is not None else None

    def scan(self) -> Listing:
        if self.root is None or not self.root.is_dir():
            return Listing([], 0)
        found: list[Run] = []
        skipped = 0
        budget = MAX_DIRS
        stack: list[tuple[Path, int, str | None]] = [(self.root, 0, None)]
        while stack and budget > 0:
            folder, depth, sweep = stack.pop()
            try:
                entries = sorted(os.scandir(folder), key=lambda e: e.name)
            except OSError:
                continue
            for entry in entries:
                if entry.name.startswith(".") or entry.name in SKIP or not _is_dir(entry):
                    continue
                budget -= 1
                real = Path(entry.path).resolve()
                if not real.is_relative_to(self.root) or real == self.root:
                    skipped += 1
                    continue
                rel = Path(entry.path).relative_to(self.root).as_posix()
                kind = _kind(real)
                if kind == "run":
                    found.append(_run(rel, real, sweep))
                    continue  # a run holds no runs
                if kind == "sweep":
                    found.append(_sweep(rel, real))
                if depth + 1 < MAX_DEPTH:
                    stack.append((Path(entry.path), depth + 1, rel if kind == "sweep" else sweep))
        for group in (r for r in found if r.kind == "sweep"):  # its jobs as listed now, else its last summary
            jobs = [r.status for r in found if r.sweep == group.id]
            group.status = overall(jobs or recorded_statuses(group.dir))
        found.sort(key=lambda r: r.id)  # a sweep before its jobs, jobs in order
        found.sort(key=lambda r: r.time, reverse=True)  # newest first (stable: keeps the above within a time)
        return Listing(found, skipped)

    def file(self, rest: str) -> tuple[Path, str]:
        """(resolved path, file name) of ``<run id>/<file>``, or an ApiError saying why not."""
        if self.root is None:
            raise ApiError(404, "This server shows no runs: it was started without an outputs dir.", code="run_not_found")
        if "\x00" in rest or "\\" in rest or ".." in rest.split("/") or rest.startswith("/"):
            message = "A run file is named by a run id from the runs listing, a slash and a file name."
            raise ApiError(400, message, code="invalid_path")
        listing = {r.id: r for r in self.scan().runs}
        # The longest listed run id the request starts with (a sweep's id is a prefix of its jobs').
        run_id = max((i for i in listing if rest.startswith(i + "/")), key=len, default=None)
        if run_id is None:
            raise ApiError(404, "No run under the outputs dir has that id; the runs listing names them.", code="run_not_found")
        name = rest[len(run_id) + 1 :]
        if not RUN_FILES.fullmatch(name):
            raise ApiError(
                400,
                f"'{name[:80]}' is not a file the runs view shares; it shares report.html, loss.png, plots/*.png, "
                "sweep_summary.{html,md,csv,json} and sweep_*.png.",
                param="file",
                code="file_not_allowed",
            )
        run_dir = listing[run_id].dir
        path = run_dir / name
        try:
            real = path.resolve(strict=True)
        except (OSError, RuntimeError):
            real = None
        if real is None or not real.is_file():
            raise ApiError(404, f"That run has no {name}.", code="file_not_found")
        if not real.is_relative_to(run_dir) or not real.is_relative_to(self.root):
            raise ApiError(403, f"{name} of that run leads outside the outputs dir.", code="file_not_allowed")
        return real, name


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()  # follows symlinks: where they lead is checked by the caller
    except OSError:
        return False


def _kind(folder: Path) -> str | None:
    if (folder / "config.yaml").is_file() or (folder / "metrics.json").is_file():
        return "run"
    if (folder / "multirun.yaml").is_file() or any(folder.glob("sweep_summary.*")):
        return "sweep"
    return None


def _shared_files(folder: Path) -> list[str]:
    names = [p.name for p in folder.iterdir() if p.is_file()]
    plots = folder / "plots"
    if plots.is_dir():
        names += [f"plots/{p.name}" for p in plots.iterdir() if p.is_file()]
    return sorted(n for n in names if RUN_FILES.fullmatch(n))


def _time(rel: str, folder: Path) -> str:
    stamp = _STAMP.search(Path(rel).name) or _STAMP.search(rel)
    if stamp:
        day, h, m, s = stamp.groups()
        return f"{day} {h}:{m}:{s}"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(folder.stat().st_mtime))


def _run(rel: str, folder: Path, sweep: str | None) -> Run:
    metrics = read_metrics(folder)
    recipe = None
    try:
        config = (folder / "config.yaml").read_text()
    except OSError:
        config = ""
    if m := _RECIPE.search(config):
        recipe = m.group(1)
    done = [s for s in metrics if isinstance(metrics[s], dict)]
    return Run(
        id=rel,
        kind="run",
        recipe=recipe or (rel.split("/")[0] if "/" in rel else None),
        time=_time(rel, folder),
        status=status_of(folder, metrics=metrics)[0],
        stages=done,
        metrics=key_metrics(metrics),
        files=_shared_files(folder),
        sweep=sweep,
        dir=folder,
    )


def _sweep(rel: str, folder: Path) -> Run:
    return Run(
        id=rel,
        kind="sweep",
        recipe=rel.split("/")[0] if "/" in rel else None,
        time=_time(rel, folder),
        status="not started",  # set from its jobs by RunsIndex.scan
        files=_shared_files(folder),
        dir=folder,
    )


TRAIN_KEYS = ("steps", "final_loss", "best_val_loss", "tokens_per_s")


def key_metrics(metrics: dict) -> list[dict]:
    """The numbers a runs table shows: training's loss and speed, then every evaluation
    metric of the fine-tuned model with the base model's value beside it.

    Only finite numbers go out: metrics.json also holds local paths (adapter dirs, report files).
    """
    out: list[dict] = []
    train = metrics.get("train") if isinstance(metrics.get("train"), dict) else {}
    for key in TRAIN_KEYS:
        if _number(train.get(key)) is not None:
            out.append({"name": f"train.{key}", "value": _number(train[key]), "base": None})
    evaluate = metrics.get("evaluate") if isinstance(metrics.get("evaluate"), dict) else {}
    base = evaluate.get("base") if isinstance(evaluate.get("base"), dict) else {}
    for split, values in evaluate.items():
        if split == "base" or not isinstance(values, dict):
            continue
        for name, value in flatten(values).items():
            if _number(value) is None or name.rsplit(".", 1)[-1] == "examples":  # a count, not a metric
                continue
            base_value = _number(lookup(base.get(split), name))
            out.append({"name": f"{split}.{name}", "value": _number(value), "base": base_value})
    return out


def _number(value) -> float | int | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return value if math.isfinite(value) else None
