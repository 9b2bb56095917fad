"""Compose once, validate once, freeze, and execute from the frozen config.yaml.

The run's command line is composed and validated exactly once (engine/config/); whatever
executes it (the CLI's own process, each rank of an ``accelerate launch``, each sweep job)
reads run_dir/config.yaml instead of composing again.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import TINY, compose, run_cli

from engine import cli, pipeline
from engine.config import composition as compose_mod
from engine.config import record
from engine.config import validation as validate_mod


@pytest.fixture
def counters(monkeypatch):
    """Counts of engine's compose and validate, Hydra's own compositions, and record reads."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl

    counts = {"hydra": 0, "read": 0}
    load = ConfigLoaderImpl.load_configuration

    def counting_load(self, *a, **k):
        counts["hydra"] += 1
        return load(self, *a, **k)

    read = record.read

    def counting_read(run_dir):
        counts["read"] += 1
        return read(run_dir)

    monkeypatch.setattr(ConfigLoaderImpl, "load_configuration", counting_load)
    monkeypatch.setattr(record, "read", counting_read)
    monkeypatch.setitem(compose_mod.COUNTS, "compose", 0)
    monkeypatch.setitem(validate_mod.COUNTS, "validate", 0)
    return counts


def test_one_run_is_composed_and_validated_once_then_executed_from_config_yaml(tmp_path, counters):
    run_dir = tmp_path / "run"
    proc = run_cli(*TINY, "stages=[prepare_data]", "data.preview=2", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert compose_mod.COUNTS["compose"] == 1
    assert validate_mod.COUNTS["validate"] == 1
    assert counters["hydra"] == 1, "Hydra composed the run a second time (e.g. through @hydra.main)"
    assert counters["read"] == 1, "the stages did not run from run_dir/config.yaml"
    frozen = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert frozen["stages"] == ["prepare_data"] and frozen["data"]["preview"] == 2
    assert (run_dir / ".hydra" / "overrides.yaml").is_file() and (run_dir / "__main__.log").is_file()


def test_execute_runs_what_config_yaml_says_not_what_was_composed(tmp_path, counters):
    cfg = compose([*TINY, "stages=[prepare_data]"])
    run_dir = tmp_path / "run"
    record.freeze(cfg, run_dir)
    text = (run_dir / "config.yaml").read_text()
    (run_dir / "config.yaml").write_text(text.replace("seed: 0", "seed: 7"))
    before = compose_mod.COUNTS["compose"]
    ctx = pipeline.execute(run_dir)
    assert ctx.cfg.seed == 7
    assert compose_mod.COUNTS["compose"] == before, "executing a frozen run composed again"


def test_other_ranks_read_the_run_dir_rank_0_froze(tmp_path, counters, monkeypatch):
    """A rank other than 0 composes nothing: it is told the run dir and executes its config.yaml."""
    import accelerate
    import accelerate.utils

    cfg = compose([*TINY, "stages=[prepare_data]"])
    run_dir = tmp_path / "run"
    record.freeze(cfg, run_dir)
    monkeypatch.setitem(compose_mod.COUNTS, "compose", 0)
    monkeypatch.setitem(validate_mod.COUNTS, "validate", 0)

    class Rank1:
        is_main_process = False

        def __init__(self, cpu: bool = False):
            pass

    def from_rank_0(message, from_process=0):
        message[0] = str(run_dir)

    executed = []
    monkeypatch.setattr(accelerate, "PartialState", Rank1)
    monkeypatch.setattr(accelerate.utils, "broadcast_object_list", from_rank_0)
    monkeypatch.setattr(cli, "execute", lambda d: executed.append(Path(d)) or 0)
    assert cli.launch_rank([*TINY, "stages=[prepare_data]"]) == 0
    assert executed == [run_dir]
    assert compose_mod.COUNTS["compose"] == 0 and validate_mod.COUNTS["validate"] == 0


def test_rank_0_refusing_the_command_line_stops_every_rank_with_status_2(counters, monkeypatch, capsys):
    import accelerate
    import accelerate.utils

    class Rank1:
        is_main_process = False

        def __init__(self, cpu: bool = False):
            pass

    monkeypatch.setattr(accelerate, "PartialState", Rank1)
    monkeypatch.setattr(accelerate.utils, "broadcast_object_list", lambda m, from_process=0: m.__setitem__(0, ("refused", 2)))
    assert cli.launch_rank([*TINY, "train.lr=abc"]) == 2
    assert capsys.readouterr().err == ""  # rank 0 says it, once


def test_each_sweep_job_validates_once_and_runs_from_its_config_yaml(tmp_path, counters):
    sweep = tmp_path / "sweep"
    proc = run_cli("-m", *TINY, "stages=[prepare_data]", "seed=0,1", f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    jobs = sorted(p for p in sweep.iterdir() if (p / "config.yaml").is_file())
    assert [yaml.safe_load((j / "config.yaml").read_text())["seed"] for j in jobs] == [0, 1]
    assert compose_mod.COUNTS["compose"] == 1  # the check of the sweep's first values, before Hydra starts
    assert validate_mod.COUNTS["validate"] == 1 + len(jobs)  # that check, then once per job
    assert counters["read"] == len(jobs)  # each job's stages ran from its config.yaml


def test_help_and_config_errors_answer_without_hydra_composing_or_torch(tmp_path):
    import subprocess
    import sys

    code = "import sys, engine.cli as c; r = c.main(sys.argv[1:]); print('TORCH', 'torch' in sys.modules); sys.exit(r)"
    for args, status in ((["--help"], 0), (["train.lr=abc"], 2), (["--cfg", "job", "model=tiny"], 0)):
        out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=tmp_path, timeout=120)
        assert out.returncode == status, out.stderr[-2000:]
        assert "TORCH False" in out.stdout, args
