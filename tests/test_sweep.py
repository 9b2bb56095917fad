"""Sweeps: the summary table, failing jobs, Optuna, the joblib launcher, kill and resume.

The default suite checks the summary on job dirs written here and that the launcher presets
compose; the real multiruns (``python -m engine -m ...`` on the tiny model) are slow-marked.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import QUICK_TRAIN, ROOT, compose, run_cli, run_engine

from engine.errors import ConfigError, UserError
from engine.runs import JOB_RECORD as RECORD
from engine.runs import STATUSES, flatten, lookup, numeric_keys, overall, status_of
from engine.sweep import summary as sm
from engine.sweep.job import objective_value, run_job
from engine.sweep.spec import check_plugins

CONF = ROOT / "engine" / "conf"
# train.lr is swept here: not also fixed (a key given twice keeps its first place in the job order).
SWEEP_ARGS = [*(a for a in QUICK_TRAIN if not a.startswith("train.lr=")), "train.max_steps=2", "stages=[prepare_data,train]"]


def rows(sweep_dir: Path) -> list[dict]:
    return list(csv.DictReader(io.StringIO((sweep_dir / "sweep_summary.csv").read_text())))


def sweep_module(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "engine.sweep", *args], cwd=cwd, env=env, capture_output=True, text=True)


def write_job(d: Path, overrides: list[str], metrics: dict | None, record: dict | None) -> Path:
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if metrics is not None:
        (d / "metrics.json").write_text(json.dumps(metrics))
    if record is not None:
        (d / RECORD).write_text(json.dumps({"overrides": overrides, "host": os.uname().nodename, **record}))
    return d


def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


@pytest.fixture
def made_sweep(tmp_path: Path) -> Path:
    """Four jobs in every state a sweep dir can hold: ok, failed, running, killed."""
    sweep = tmp_path / "multirun_x"
    sweep.mkdir()
    (sweep / "multirun.yaml").write_text(
        yaml.safe_dump({"sweep": {"objective": "train.final_loss", "direction": "minimize", "metric": None}, "hydra": {}})
    )
    train = lambda loss, tps: {"train": {"final_loss": loss, "tokens_per_s": tps, "steps": 2, "seconds": 1.0}}  # noqa: E731
    write_job(sweep / "0", ["model=tiny", "adapter.r=4", "train.lr=0.01"], train(2.5, 100.0), {"status": "ok", "wall_s": 3.0})
    write_job(sweep / "1", ["model=tiny", "adapter.r=8", "train.lr=0.01"], train(2.1, 90.0), {"status": "ok", "wall_s": 4.0})
    write_job(
        sweep / "2",
        ["model=tiny", "adapter.r=4", "train.lr=1e9"],
        {"prepare_data": {"seconds": 1}},
        {"status": "failed", "error": "step 1: the trainable weights grew", "wall_s": 1.0},
    )
    write_job(sweep / "3", ["model=tiny", "adapter.r=8", "train.lr=1e9"], None, {"status": "running", "pid": os.getpid()})
    write_job(sweep / "4", ["model=tiny", "adapter.r=16", "train.lr=0.01"], None, {"status": "running", "pid": dead_pid()})
    return sweep


# ---------------------------------------------------------------- the summary on written job dirs


def test_summary_names_states_swept_keys_and_the_best_job(made_sweep):
    s = sm.rebuild(made_sweep)
    assert [p.name for p in made_sweep.glob("sweep_summary.*")] and all((made_sweep / n).is_file() for n in sm.NAMES)
    table = rows(made_sweep)
    assert [r["job"] for r in table] == ["0", "1", "2", "3", "4"]
    assert [r["status"] for r in table] == ["ok", "ok", "failed", "running", "interrupted"]
    assert s.swept == ["adapter.r", "train.lr"]  # model=tiny is the same everywhere: not a column
    assert table[2]["error"] == "step 1: the trainable weights grew"
    assert table[1]["train.final_loss"] == "2.1" and table[1]["tokens_per_s"] == "90"
    assert s.best is not None and s.best.job == "1"
    md = (made_sweep / "sweep_summary.md").read_text()
    assert "**best: job 1** (adapter.r=8, train.lr=0.01): `train.final_loss` = 2.1" in md
    assert "`python -m engine model=tiny adapter.r=8 train.lr=0.01`" in md
    page = (made_sweep / "sweep_summary.html").read_text()
    assert "data:image/png;base64," in page and "http://" not in page and "https://" not in page
    assert (made_sweep / "sweep_summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((made_sweep / "sweep_summary.json").read_text())["best"]["job"] == "1"


def test_maximize_picks_the_largest_and_a_failed_job_is_never_best(made_sweep):
    s = sm.collect_sweep(made_sweep, objective="train.tokens_per_s", direction="maximize")
    assert s.best.job == "0"
    assert s.metric == "train.tokens_per_s" and s.metric_keys[0] == "train.tokens_per_s"


def test_cli_rebuilds_the_same_files_and_compares_run_dirs(made_sweep, tmp_path):
    sm.rebuild(made_sweep)
    before = {n: (made_sweep / n).read_bytes() for n in sm.NAMES if not n.endswith(".png")}
    proc = sweep_module(str(made_sweep))
    assert proc.returncode == 0, proc.stderr
    assert {n: (made_sweep / n).read_bytes() for n in before} == before
    assert "| 4 | interrupted |" in proc.stdout

    a, b = tmp_path / "a", tmp_path / "b"
    for d, r in ((a, 4), (b, 16)):
        d.mkdir()
        (d / "config.yaml").write_text(yaml.safe_dump({"recipe": "x", "stages": ["train"], "adapter": {"r": r, "alpha": 16}}))
        (d / "metrics.json").write_text(json.dumps({"train": {"final_loss": r / 10, "seconds": 2}}))
    out = tmp_path / "cmp"
    proc = run_engine("sweep", "--compare", str(a), str(b), "--out", str(out))  # the `engine sweep` alias
    assert proc.returncode == 0, proc.stderr
    table = rows(out)
    assert [(r["status"], r["adapter.r"], r["train.final_loss"]) for r in table] == [("ok", "4", "0.4"), ("ok", "16", "1.6")]
    assert "adapter.alpha" not in table[0]  # the same in both: not a column


def test_one_status_vocabulary_for_run_dirs_sweep_jobs_and_the_runs_page(made_sweep, tmp_path):
    """engine.runs.status_of is the one reader of a run's state: the summary and the runs page agree."""
    from engine.serve.ui import RunsIndex

    def run(name: str, stages: list[str], metrics: dict | None, lock: str = "") -> Path:
        d = tmp_path / "outputs" / name
        d.mkdir(parents=True)
        (d / "config.yaml").write_text(yaml.safe_dump({"recipe": "x", "stages": stages}))
        if metrics is not None:
            (d / "metrics.json").write_text(json.dumps(metrics))
        (d / ".lock").write_text(lock)
        return d

    dirs = [
        run("done", ["train"], {"train": {"steps": 1}}),
        run("half", ["train", "evaluate"], {"train": {"steps": 1}}),
        run("empty", ["train"], None),
        run("live", ["train"], {}, lock=f"{os.getpid()}\n"),
        run("killed", ["train"], {}, lock=f"{dead_pid()}\n"),
    ]
    expected = ["ok", "incomplete", "not started", "running", "interrupted"]
    assert [status_of(d)[0] for d in dirs] == expected
    assert [r.status for r in sm.collect_runs(dirs).rows] == expected
    page = {r.id: r.status for r in RunsIndex(tmp_path / "outputs").scan().runs}
    assert [page[d.name] for d in dirs] == expected
    assert set(expected) <= set(STATUSES)
    # a sweep job's record decides, but only in the vocabulary; a sweep's status is its jobs' overall one
    assert [status_of(made_sweep / j)[0] for j in "01234"] == ["ok", "ok", "failed", "running", "interrupted"]
    (made_sweep / "0" / RECORD).write_text(json.dumps({"status": "<b>done</b>"}))
    assert status_of(made_sweep / "0")[0] == "ok"  # from its metrics.json, not the odd word
    assert overall(["ok", "ok"]) == "ok" and overall(["ok", "failed", "running"]) == "running"
    assert overall(["ok", "interrupted", "failed"]) == "failed" and overall(["ok", "not started"]) == "incomplete"
    assert overall([]) == "not started"


def test_metrics_json_is_walked_by_one_flatten():
    metrics = {"train": {"steps": 2, "done": True, "speedups": {}}, "evaluate": {"test": {"f1": 0.5, "note": "x"}}}
    assert flatten(metrics) == {
        "train.steps": 2,
        "train.done": True,
        "train.speedups": {},
        "evaluate.test.f1": 0.5,
        "evaluate.test.note": "x",
    }
    assert numeric_keys(metrics) == ["train.steps", "evaluate.test.f1"]  # a bool is a flag, not a number
    assert lookup(metrics, "evaluate.test.f1") == 0.5 and lookup(metrics, "evaluate.nope.f1") is None
    assert lookup(None, "a") is None and flatten(["not", "a", "dict"]) == {}


def test_cli_says_what_is_wrong_without_a_traceback(tmp_path):
    proc = sweep_module(str(tmp_path))
    assert proc.returncode == 2 and "holds no sweep job" in proc.stderr and "Traceback" not in proc.stderr
    proc = sweep_module(str(tmp_path), "--metric", "final loss")
    assert proc.returncode == 2 and "not a metrics.json key" in proc.stderr


# ---------------------------------------------------------------- one job: record, failure, skip


def test_a_job_records_failure_returns_nan_and_a_finished_job_is_skipped(tmp_path):
    job = tmp_path / "0"
    job.mkdir()

    def fails():
        raise UserError("data.path: no such file")

    value = run_job(job, ["a=1"], objective="train.final_loss", work=fails)
    assert value != value  # NaN: the sweep goes on
    rec = json.loads((job / RECORD).read_text())
    assert rec["status"] == "failed" and rec["error"] == "data.path: no such file" and rec["attempt"] == 1

    calls = []

    def works():
        calls.append(1)
        (job / "metrics.json").write_text(json.dumps({"train": {"final_loss": 1.5}}))

    assert run_job(job, ["a=1"], objective="train.final_loss", work=works) == 1.5
    rec = json.loads((job / RECORD).read_text())
    assert rec["status"] == "ok" and rec["attempt"] == 2 and rec["previous_status"] == "failed" and rec["peak_rss_mb"] > 0
    assert run_job(job, ["a=1"], objective="train.final_loss", work=works) == 1.5 and calls == [1]  # skipped
    assert run_job(job, ["a=2"], objective=None, work=works) is None and calls == [1, 1]  # other overrides: runs


def test_a_stop_is_recorded_as_interrupted_and_ends_the_sweep(tmp_path):
    def stopped():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_job(tmp_path, ["a=1"], objective=None, work=stopped)
    assert json.loads((tmp_path / RECORD).read_text())["status"] == "interrupted"


def test_objective_errors_list_the_keys_that_exist():
    metrics = {"train": {"final_loss": 1.0, "steps": 2}, "evaluate": {"test": {"token_f1": 0.5}}}
    assert objective_value(metrics, "evaluate.test.token_f1") == 0.5
    with pytest.raises(UserError, match=r"'train.final_los' is not in .*train.final_loss, train.steps"):
        objective_value(metrics, "train.final_los")


# ---------------------------------------------------------------- config: objective, presets


def test_the_objective_must_be_a_key_of_a_stage_that_runs():
    cfg = compose([*SWEEP_ARGS, "sweep.objective=train.final_loss", "sweep.direction=maximize"])
    assert cfg.sweep.objective == "train.final_loss" and cfg.sweep.direction == "maximize"
    with pytest.raises(ConfigError, match="sweep.objective: 'evaluate.test.token_f1' is under 'evaluate'"):
        compose([*SWEEP_ARGS, "sweep.objective=evaluate.test.token_f1"])
    with pytest.raises(ConfigError, match="sweep.metric: 'loss' is not a metrics.json key"):
        compose([*SWEEP_ARGS, "sweep.metric=loss"])


def test_optuna_without_an_objective_is_refused_up_front():
    problems = check_plugins(["hydra/sweeper=optuna_lora"], str(CONF), {"objective": None})
    assert any(p.startswith("sweep.objective: not set, and hydra/sweeper=optuna_lora optimises it") for p in problems)
    assert check_plugins(["hydra/sweeper=optuna_lora"], str(CONF), {"objective": "train.final_loss"}) == [] or not (
        importlib.util.find_spec("hydra_plugins.hydra_optuna_sweeper")
    )


RAY = importlib.util.find_spec("hydra_plugins.hydra_ray_launcher") is not None


@pytest.mark.parametrize(
    "choice, expect",
    [
        ("hydra/launcher=slurm", "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"),
        pytest.param(
            "hydra/launcher=ray_cluster",
            "hydra_plugins.hydra_ray_launcher.ray_launcher.RayLauncher",
            marks=pytest.mark.skipif(not RAY, reason="hydra-ray-launcher is not installed (pip install 'engine[cluster]')"),
        ),
        ("hydra/launcher=local_parallel", "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"),
        ("hydra/sweeper=optuna_lora", "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"),
    ],
)
def test_launcher_and_sweeper_presets_compose(choice, expect):
    proc = run_cli(*SWEEP_ARGS, choice, "sweep.objective=train.final_loss", "--cfg", "hydra")
    assert proc.returncode == 0, proc.stderr[-2000:]
    hydra = yaml.safe_load(proc.stdout)["hydra"]
    node = hydra["launcher" if "launcher" in choice else "sweeper"]
    assert node["_target_"] == expect
    assert hydra["callbacks"]["sweep_summary"]["_target_"] == "engine.sweep.callback.SweepSummary"


# ---------------------------------------------------------------- real multiruns (slow)


@pytest.fixture(scope="module")
def basic_sweep(tmp_path_factory):
    """2 x 2 on the tiny model; train.lr=1e9 makes two jobs fail (the loop stops a diverged run)."""
    out = tmp_path_factory.mktemp("basic")
    proc = run_engine("-m", *SWEEP_ARGS, "adapter.r=4,8", "train.lr=1e-2,1e9", f"hydra.sweep.dir={out}")
    return out, proc


@pytest.mark.slow
def test_a_2x2_sweep_gives_4_job_dirs_and_a_4_row_summary_with_failures_recorded(basic_sweep):
    out, proc = basic_sweep
    assert proc.returncode == 1, proc.stderr[-3000:]  # two jobs failed: the sweep says so at the end
    assert "2 of 4 sweep jobs failed" in proc.stderr and "Traceback" not in proc.stderr
    assert sorted(d.name for d in out.iterdir() if d.is_dir()) == ["0", "1", "2", "3"]
    assert all((out / n).is_file() for n in sm.NAMES)
    table = rows(out)
    assert [(r["adapter.r"], r["train.lr"], r["status"]) for r in table] == [
        ("4", "0.01", "ok"),
        ("4", "1000000000.0", "failed"),
        ("8", "0.01", "ok"),
        ("8", "1000000000.0", "failed"),
    ]
    for r in table:
        if r["status"] == "ok":
            assert float(r["train.final_loss"]) > 0 and float(r["tokens_per_s"]) > 0 and float(r["peak_rss_mb"]) > 0
            assert (out / r["job"] / "adapter" / "adapter_config.json").is_file()
        else:
            assert "weights grew" in r["error"] and "train.lr" in r["error"]


@pytest.mark.slow
def test_joblib_runs_two_jobs_at_once_with_the_same_summary_as_basic(basic_sweep, tmp_path):
    basic, _ = basic_sweep
    args = ["-m", *SWEEP_ARGS, "adapter.r=4,8", "train.lr=1e-2,1e9", "hydra/launcher=local_parallel"]
    proc = run_engine(*args, f"hydra.sweep.dir={tmp_path}")
    assert proc.returncode == 1, proc.stderr[-3000:]
    records = [json.loads((tmp_path / j / RECORD).read_text()) for j in "0123"]
    assert len({r["pid"] for r in records}) == 2  # two worker processes
    spans = sorted((r["started"], r["finished"]) for r in records)
    assert any(b[0] < a[1] for a, b in zip(spans, spans[1:], strict=False)), spans  # overlapping jobs
    same = ("job", "status", "adapter.r", "train.lr", "train.steps", "error", "command")
    ours, theirs = rows(tmp_path), rows(basic)
    assert [{k: r[k] for k in same} for r in ours] == [{k: r[k] for k in same} for r in theirs]
    for a, b in zip(ours, theirs, strict=True):
        if a["status"] == "ok":
            assert float(a["train.final_loss"]) == pytest.approx(float(b["train.final_loss"]), rel=1e-4)


@pytest.mark.slow
@pytest.mark.skipif(not importlib.util.find_spec("hydra_plugins.hydra_optuna_sweeper"), reason="pip install 'engine[sweep]'")
def test_an_optuna_sweep_names_its_best_trial_and_the_table_rebuilds_the_same(tmp_path):
    proc = run_engine(
        "-m",
        *SWEEP_ARGS,
        "hydra/sweeper=optuna_lora",
        "hydra.sweeper.n_trials=3",
        "train.lr=tag(log, interval(1e-3, 1e-1))",  # the command line's search space replaces the preset's
        "adapter.r=choice(2, 4, 8)",
        "sweep.objective=train.final_loss",
        f"hydra.sweep.dir={tmp_path}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = rows(tmp_path)
    assert len(table) == 3 and {r["status"] for r in table} == {"ok"}
    best = min(table, key=lambda r: float(r["train.final_loss"]))
    found = json.loads((tmp_path / "sweep_summary.json").read_text())["best"]
    assert found["job"] == best["job"] and found["command"] == best["command"]
    optuna = yaml.safe_load((tmp_path / "optimization_results.yaml").read_text())
    assert optuna["best_value"] == pytest.approx(float(best["train.final_loss"]), rel=1e-5)
    md = (tmp_path / "sweep_summary.md").read_text()
    assert f"**best: job {best['job']}**" in md and "best job's command: `python -m engine" in md
    before = {n: (tmp_path / n).read_text() for n in ("sweep_summary.csv", "sweep_summary.md", "sweep_summary.json")}
    proc = sweep_module(str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert {n: (tmp_path / n).read_text() for n in before} == before


@pytest.mark.slow
def test_a_killed_sweep_reruns_only_what_did_not_finish_and_resumes_the_killed_job(tmp_path):
    # Job 0 (2 steps) finishes; job 1 (6 steps, a checkpoint every 2) is SIGKILLed at step 5
    # (engine's crash hook: the whole sweep process dies, as with kill -9).
    args = ["-m", *QUICK_TRAIN, "stages=[prepare_data,train]", "train.save_every=2", "train.max_steps=2,6"]
    env_crash = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore", "ENGINE_CRASH_AT": "step:5"}
    proc = subprocess.run(
        [sys.executable, "-m", "engine", *args, f"hydra.sweep.dir={tmp_path}"],
        cwd=ROOT,
        env=env_crash,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert sweep_module(str(tmp_path)).returncode == 0
    assert [(r["job"], r["status"]) for r in rows(tmp_path)] == [("0", "ok"), ("1", "interrupted")]
    first = (tmp_path / "0" / "metrics.json").stat().st_mtime_ns

    proc = run_engine(*args, f"hydra.sweep.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "sweep job 0: finished in an earlier run of this sweep (ok), not run again" in proc.stdout
    assert (tmp_path / "0" / "metrics.json").stat().st_mtime_ns == first
    assert json.loads((tmp_path / "0" / RECORD).read_text())["attempt"] == 1
    rec = json.loads((tmp_path / "1" / RECORD).read_text())
    assert rec["attempt"] == 2 and rec["previous_status"] == "running"
    train = json.loads((tmp_path / "1" / "metrics.json").read_text())["train"]
    assert train["resumed_from_step"] == 4 and train["steps"] == 6
    assert [(r["job"], r["status"], r["train.steps"]) for r in rows(tmp_path)] == [("0", "ok", "2"), ("1", "ok", "6")]
