"""A sweep's results as one table: ``sweep_summary.csv/.md/.html/.json`` and ``sweep_summary.png``.

Everything is read back from the job dirs, never from memory, so the same table comes out
whether the Hydra callback writes it at the end of a sweep, after each job, or a user rebuilds
it later (``python -m engine.sweep DIR``) for a sweep that is still running or was killed.
Per job: the overrides that vary across jobs (``.hydra/overrides.yaml``), key metrics from
``metrics.json``, wall time, tokens/s and peak memory (``sweep_job.json``), and the status
as ``engine.runs.status_of`` reads it (the vocabulary the runs page shows too): ``ok``,
``failed`` (with the error's first line), ``interrupted``, ``running``, ``incomplete``, ``not started``.
The pages are written by ``engine.render`` (as the run report is).

File names are fixed (the web UI lists ``sweep_summary.*`` and ``sweep_*.png``); the table holds no
timestamps, so rebuilding a finished sweep's summary gives the same files.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.files import read_json_record, write_json_atomic, write_text_atomic
from engine.render.page import Block
from engine.render.page import to_html as page_html
from engine.render.page import to_markdown as page_markdown
from engine.render.plot import figure
from engine.render.plot import png as png_bytes
from engine.runs import JOB_RECORD, STATUSES, flatten, is_number, lookup, read_job_record, read_metrics, read_yaml, status_of

NAMES = ("sweep_summary.csv", "sweep_summary.md", "sweep_summary.html", "sweep_summary.json", "sweep_summary.png")
DEFAULT_METRIC = "train.final_loss"
# Always-shown metrics (when any job has them), besides the objective, the plotted metric and
# evaluate.<split>.* of the fine-tuned model.
KEY_METRICS = ("train.final_loss", "train.best_val_loss", "train.steps")
NOT_SPLITS = {"base", "lm_eval", "suites", "examples", "stops", "seconds", "cosine_backend"}


@dataclass
class Row:
    job: str
    path: Path
    status: str
    error: str = ""
    params: dict[str, str] = field(default_factory=dict)
    """The job's task overrides (key -> value as typed), or its flattened config.yaml (``--compare``)."""
    overrides: list[str] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)
    record: dict = field(default_factory=dict)

    @property
    def wall_s(self) -> float | None:
        if isinstance(self.record.get("wall_s"), int | float):
            return self.record["wall_s"]
        seconds = [v.get("seconds") for v in self.metrics.values() if isinstance(v, dict)]
        seconds = [s for s in seconds if isinstance(s, int | float)]
        return round(sum(seconds), 2) if seconds else None

    def command(self) -> str:
        """The command that runs this job alone (its overrides, as Hydra recorded them)."""
        return " ".join(["python -m engine", *(shlex.quote(o) for o in self.overrides)])


@dataclass
class Summary:
    source: str
    """The sweep dir's name, or ``compare``."""
    rows: list[Row]
    swept: list[str]
    metric_keys: list[str]
    metric: str
    objective: str | None = None
    direction: str = "minimize"
    sweeper: str | None = None
    best: Row | None = None
    optuna: dict | None = None
    """The Optuna sweeper's optimization_results.yaml (best_params, best_value), when written."""

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.rows:
            out[r.status] = out.get(r.status, 0) + 1
        return out

    @property
    def failed(self) -> list[Row]:
        return [r for r in self.rows if r.status == "failed"]

    def columns(self) -> list[str]:
        cols = ["job", "status", *self.swept, *self.metric_keys, "wall_s", "tokens_per_s", "peak_rss_mb"]
        if any("peak_cuda_mb" in r.record for r in self.rows):
            cols.append("peak_cuda_mb")
        return [*cols, "error"]

    def cell(self, row: Row, col: str) -> Any:
        if col == "job":
            return row.job
        if col == "status":
            return row.status
        if col == "error":
            return row.error
        if col in self.swept:
            return row.params.get(col)
        if col == "wall_s":
            return row.wall_s
        if col == "tokens_per_s":
            return lookup(row.metrics, "train.tokens_per_s")
        if col in ("peak_rss_mb", "peak_cuda_mb"):
            return row.record.get(col)
        return lookup(row.metrics, col)


# ---------------------------------------------------------------- collecting


def collect_sweep(
    sweep_dir: Path, *, metric: str | None = None, objective: str | None = None, direction: str | None = None
) -> Summary:
    """Every job dir under a multirun dir (in job order), whatever state each is in."""
    sweep_dir = Path(sweep_dir)
    settings = _sweep_settings(sweep_dir)
    jobs = sorted((d for d in _children(sweep_dir) if _is_job(d)), key=lambda d: (not d.name.isdigit(), _num(d.name), d.name))
    rows = [_row(d, d.name) for d in jobs]
    optuna = read_yaml(sweep_dir / "optimization_results.yaml")
    return _summarise(
        sweep_dir.name,
        rows,
        swept=_varying({r.job: r.params for r in rows}),
        metric=metric or settings.get("metric"),
        objective=objective or settings.get("objective"),
        direction=direction or settings.get("direction") or "minimize",
        sweeper=settings.get("sweeper"),
        optuna=optuna if isinstance(optuna, dict) else None,
    )


def collect_runs(
    run_dirs: list[Path], *, metric: str | None = None, objective: str | None = None, direction: str | None = None
) -> Summary:
    """The same table for any run dirs (``--compare``): what differs is read from their config.yaml."""
    rows = []
    for d in run_dirs:
        row = _row(Path(d), str(d))
        row.params = _config_params(read_yaml(Path(d) / "config.yaml")) or row.params
        rows.append(row)
    return _summarise(
        "compare",
        rows,
        swept=_varying({r.job: r.params for r in rows}),
        metric=metric,
        objective=objective,
        direction=direction or "minimize",
    )


def _summarise(source: str, rows: list[Row], *, swept, metric, objective, direction, sweeper=None, optuna=None) -> Summary:
    metric = metric or objective or DEFAULT_METRIC
    keys: list[str] = []
    for key in [*([objective] if objective else []), metric, *KEY_METRICS, *_eval_keys(rows)]:
        if key not in keys and any(isinstance(lookup(r.metrics, key), int | float) for r in rows):
            keys.append(key)
    if metric not in keys:
        keys.insert(0, metric)
    best = None
    if objective:
        scored = [r for r in rows if r.status == "ok" and _finite(lookup(r.metrics, objective))]
        if scored:
            pick = min if direction == "minimize" else max
            best = pick(scored, key=lambda r: lookup(r.metrics, objective))
    return Summary(source, rows, swept, keys, metric, objective, direction, sweeper, best, optuna)


def _eval_keys(rows: list[Row]) -> list[str]:
    """``evaluate.<split>.<metric>`` of the fine-tuned model, in the order the runs wrote them."""
    out: list[str] = []
    for r in rows:
        for split, node in (r.metrics.get("evaluate") or {}).items():
            if split in NOT_SPLITS or not isinstance(node, dict):
                continue
            for k, v in node.items():
                if is_number(v) and f"evaluate.{split}.{k}" not in out:
                    out.append(f"evaluate.{split}.{k}")
    return out


def _row(d: Path, name: str) -> Row:
    overrides = read_yaml(d / ".hydra" / "overrides.yaml")
    overrides = [str(o) for o in overrides] if isinstance(overrides, list) else []
    metrics = read_metrics(d)
    record = read_job_record(d) or {}
    status, error = status_of(d, record, metrics)
    return Row(name, d, status, error, _params(overrides), overrides, metrics, record)


def _sweep_settings(sweep_dir: Path) -> dict:
    """sweep.* and the sweeper's name, from Hydra's multirun.yaml (else the first job's config)."""
    cfg = read_yaml(sweep_dir / "multirun.yaml")
    if not isinstance(cfg, dict):
        first = next((d for d in _children(sweep_dir) if (d / ".hydra" / "config.yaml").is_file()), None)
        cfg = read_yaml(first / ".hydra" / "config.yaml") if first else {}
    cfg = cfg if isinstance(cfg, dict) else {}
    out = dict(cfg.get("sweep") or {})
    target = str(((cfg.get("hydra") or {}).get("sweeper") or {}).get("_target_", ""))
    out["sweeper"] = "optuna" if "optuna" in target else ("basic" if target else None)
    return out


def _children(d: Path) -> list[Path]:
    try:
        return [p for p in d.iterdir() if p.is_dir() and not p.name.startswith(".")]
    except OSError:
        return []


def _is_job(d: Path) -> bool:
    return (d / JOB_RECORD).is_file() or (d / ".hydra" / "overrides.yaml").is_file()


def _num(name: str) -> int:
    return int(name) if name.isdigit() else 0


def _params(overrides: list[str]) -> dict[str, str]:
    out = {}
    for o in overrides:
        key, eq, value = o.partition("=")
        if eq:
            out[key.lstrip("+~")] = value
    return out


def _config_params(config: Any) -> dict[str, str]:
    """A run's config.yaml as ``key -> value`` strings (lists and empty dicts as JSON): what ``--compare`` tables."""
    return {k: json.dumps(v) if isinstance(v, list | dict) else str(v) for k, v in flatten(config).items()}


def _varying(params: dict[str, dict[str, str]]) -> list[str]:
    """Keys whose value is not the same in every row (a key some rows lack varies too)."""
    keys: list[str] = []
    for p in params.values():
        keys += [k for k in p if k not in keys]
    return [k for k in keys if len({p.get(k) for p in params.values()}) > 1]


def _finite(v: Any) -> bool:
    return is_number(v) and math.isfinite(v)


# ---------------------------------------------------------------- writing


def fmt(v: Any) -> str:
    """One spelling of a value for csv, md and html: numbers to 6 significant digits, None empty."""
    if v is None:
        return ""
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def write(summary: Summary, out_dir: Path) -> list[Path]:
    """Write the five files into ``out_dir`` (each atomically); returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    png = plot(summary)
    paths = [out_dir / n for n in NAMES]
    write_text_atomic(paths[0], to_csv(summary))
    write_text_atomic(paths[1], to_markdown(summary))
    write_text_atomic(paths[2], to_html(summary, png))
    write_json_atomic(paths[3], to_json(summary))
    tmp = paths[4].with_name(f".{paths[4].name}.tmp{os.getpid()}")
    tmp.write_bytes(png)
    os.replace(tmp, paths[4])
    return paths


def to_csv(s: Summary) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    cols = s.columns()
    w.writerow([*cols, "command"])
    for r in s.rows:
        w.writerow([*(fmt(s.cell(r, c)) for c in cols), r.command() if r.overrides else ""])
    return buf.getvalue()


def headline(s: Summary) -> list[str]:
    """What the sweep was and how it went, before the table (markdown)."""
    counts = ", ".join(f"{n} {status}" for status, n in sorted(s.counts().items()))
    lines = [f"jobs: {len(s.rows)} ({counts or 'none yet'})"]
    if s.sweeper:
        lines.append(f"sweeper: {s.sweeper}")
    if s.objective:
        lines.append(f"objective: `{s.objective}` ({s.direction})")
    if s.best is not None:
        value = fmt(lookup(s.best.metrics, s.objective))
        lines.append(f"**best: job {s.best.job}** ({_swept_values(s, s.best)}): `{s.objective}` = {value}")
        if s.best.overrides:
            lines.append(f"best job's command: `{s.best.command()}`")
    elif s.objective:
        lines.append(f"best: none yet (no finished job has `{s.objective}`)")
    for r in s.failed:
        lines.append(f"job {r.job} failed: {r.error}")
    return lines


def _swept_values(s: Summary, r: Row) -> str:
    return ", ".join(f"{k}={r.params.get(k)}" for k in s.swept) or "no swept keys"


def page(s: Summary, png: bytes = b"") -> list[Block]:
    """The summary as page blocks: the headline, the table (each status coloured, the best row
    marked), the plot (``png`` inlined in HTML; Markdown links sweep_summary.png)."""
    cols = s.columns()
    text_cols = {"job", "status", "error", *s.swept}

    def cls(r: Row, c: str) -> str:
        return " ".join(x for x in ("t" if c in text_cols else "", r.status if c == "status" else "") if x)

    table = Block(
        "table",
        header=cols,
        rows=[[fmt(s.cell(r, c)) for c in cols] for r in s.rows],
        classes=[[cls(r, c) for c in cols] for r in s.rows],
        row_classes=["best" if r is s.best else "" for r in s.rows],
    )
    plot_block = Block("img", f"{s.metric} against each swept key", png=png, path=NAMES[4])
    return [Block("list", items=headline(s)), table, plot_block]


def to_markdown(s: Summary) -> str:
    return page_markdown(f"Sweep summary: {s.source}", page(s))


STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:2rem;color:#1d1d1f}
table{border-collapse:collapse;margin:1rem 0}th,td{border:1px solid #d0d0d7;padding:.3rem .6rem;text-align:right}
th{background:#f2f2f5}td.t{text-align:left}tr.best td{background:#e8f6e8;font-weight:600}
.ok{color:#1a7f37}.failed{color:#c62828}.interrupted,.incomplete{color:#b26a00}.running{color:#0b5cad}
code{background:#f2f2f5;padding:.1rem .3rem}img{max-width:100%}
"""


def to_html(s: Summary, png: bytes) -> str:
    """The same table as one self-contained page: inline style, the plot as a data URI."""
    return page_html(f"Sweep summary: {s.source}", page(s, png), STYLE)


def to_json(s: Summary) -> dict:
    cols = s.columns()
    return {
        "source": s.source,
        "sweeper": s.sweeper,
        "objective": s.objective,
        "direction": s.direction,
        "metric": s.metric,
        "swept": s.swept,
        "columns": cols,
        "rows": [{**{c: s.cell(r, c) for c in cols}, "command": r.command() if r.overrides else None} for r in s.rows],
        "best": None
        if s.best is None
        else {"job": s.best.job, "value": lookup(s.best.metrics, s.objective), "command": s.best.command()},
        "optuna": s.optuna,
    }


def plot(s: Summary) -> bytes:
    """``metric`` against each swept key, one panel per key (finished jobs; the best one marked)."""
    keys = s.swept or ["job"]
    fig, axes = figure(1, len(keys), size=(max(4.0, 3.6 * len(keys)), 3.4), squeeze=False)
    points = [(r, lookup(r.metrics, s.metric)) for r in s.rows]
    points = [(r, float(v)) for r, v in points if _finite(v)]
    for ax, key in zip(axes[0], keys, strict=True):
        xs = [r.job if key == "job" else r.params.get(key, "") for r, _ in points]
        ys = [v for _, v in points]
        numeric = all(_parses_as_number(x) for x in xs) and key != "job"
        if numeric:
            xs_num = [float(x) for x in xs]
            ax.scatter(xs_num, ys, color="#0b5cad", zorder=3)
            positive = [x for x in xs_num if x > 0]
            if len(positive) == len(xs_num) and positive and max(positive) / min(positive) >= 50:
                ax.set_xscale("log")
            best_x = [float(r.params.get(key)) for r, _ in points if r is s.best]
        else:
            cats = list(dict.fromkeys(str(x) for x in xs))
            ax.scatter([cats.index(str(x)) for x in xs], ys, color="#0b5cad", zorder=3)
            ax.set_xticks(range(len(cats)), cats, rotation=30 if len(cats) > 4 else 0)
            best_x = [cats.index(str(key == "job" and r.job or r.params.get(key))) for r, _ in points if r is s.best]
        if best_x:
            ax.scatter(best_x, [v for r, v in points if r is s.best], s=120, facecolors="none", edgecolors="#1a7f37", zorder=4)
        ax.set_xlabel(key)
        ax.set_ylabel(s.metric)
        ax.grid(alpha=0.3)
        if not points:
            ax.text(0.5, 0.5, f"no finished job has\n{s.metric} yet", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(f"{s.source}: {s.metric}", fontsize=10)
    return png_bytes(fig)


def _parses_as_number(x: Any) -> bool:
    try:
        return math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


def recorded_statuses(sweep_dir: Path) -> list[str]:
    """Each job's status as the last summary written in ``sweep_dir`` recorded it (sweep_summary.json)."""
    rows = read_json_record(Path(sweep_dir) / NAMES[3]).get("rows")
    rows = rows if isinstance(rows, list) else []
    return [r["status"] for r in rows if isinstance(r, dict) and r.get("status") in STATUSES]


def rebuild(sweep_dir: Path, **settings) -> Summary:
    """Collect and write a sweep dir's summary in place (the callback's and the CLI's one call)."""
    summary = collect_sweep(sweep_dir, **settings)
    write(summary, sweep_dir)
    return summary


__all__ = ["NAMES", "Row", "Summary", "collect_runs", "collect_sweep", "rebuild", "recorded_statuses", "write"]
