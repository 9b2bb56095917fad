"""The command line: compose -> validate -> freeze -> launch, each once.

Imports below are made where they are needed: ``engine --help`` and a config error must answer
in well under a second, before the stage registry or anything heavy is loaded.

    engine [overrides]                one run: composed and validated here, frozen into
                                      run_dir/config.yaml, then executed from that file
    engine -m [sweep overrides]       a sweep: checked here (first values), run by Hydra's
                                      sweeper/launcher; each job validates and freezes its own
    engine --cfg job | --help         print, nothing runs (no torch imported)

Under ``accelerate launch`` rank 0 does the single run's steps and tells the other ranks the
run dir; they read its config.yaml and never compose. Composition itself is engine/config/.
A user mistake (a typo, a wrong type, a run dir that cannot be written or is in use) exits with
status 2 and a short message instead of a traceback.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from engine.config import CONF_DIR, compose_checked, validate
from engine.config.composition import parse_args, use_config_dirs
from engine.errors import ConfigError, UserError

HELP_FLAGS = {"--help", "-h"}
HYDRA_INFO_FLAGS = {"--hydra-help", "--info", "-i", "--version", "--shell-completion", "-sc"}
CFG_FLAGS = {"--cfg", "-c"}


def main(argv: list[str]) -> int:
    """The whole command: returns the exit status (the entry point exits with it)."""
    from engine.settings import export_to_environment

    export_to_environment()
    try:
        if any(a in HELP_FLAGS for a in argv):
            from engine.help import help_text

            print(help_text(use_config_dirs(argv), CONF_DIR))
            return 0
        if any(_flag(a) in HYDRA_INFO_FLAGS | CFG_FLAGS for a in argv):
            if any(_flag(a) in CFG_FLAGS for a in argv):
                compose_checked(argv)  # secrets are refused before Hydra prints the config
            return hydra_main(use_config_dirs(argv))
        if parse_args(argv).multirun:
            return hydra_main(check_sweep(argv))
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            return launch_rank(argv)
        return launch(argv)
    except UserError as e:
        return fail(e)


def _flag(arg: str) -> str:
    """``--cfg=job`` -> ``--cfg``: a flag as Hydra's parser reads it, with or without ``=value``."""
    return arg.split("=", 1)[0]


def fail(err: UserError) -> int:
    sys.stderr.write(f"engine: {err}\n" if not isinstance(err, ConfigError) else f"engine: {err.format()}\n")
    return err.exit_code


# ---------------------------------------------------------------- one run


def launch(argv: list[str]) -> int:
    """One run in this process: compose, validate, claim the run dir, freeze, execute config.yaml."""
    return execute(frozen_run(argv, lock=True))


def frozen_run(argv: list[str], *, lock: bool) -> Path:
    """Compose and validate the command line once, make (and ``lock``) its run dir, decide resume,
    write config.yaml and set up Hydra's job record: the run dir, ready to execute."""
    from engine.config.job import start_job
    from engine.config.record import claim_run_dir, freeze, make_run_dir

    composed = compose_checked(argv)
    cfg = validate(composed.raw)
    where = Path(composed.hydra["run_dir"])
    run_dir = claim_run_dir(where) if lock else make_run_dir(where, "hydra.run.dir")
    freeze(cfg, run_dir)
    start_job(composed, run_dir)
    return run_dir


def execute(run_dir: Path) -> int:
    """Run the stages of ``run_dir/config.yaml``; a user mistake found on the way exits 2."""
    from engine.pipeline import execute as run_stages

    try:
        run_stages(run_dir)
    except UserError as e:
        return fail(e)
    return 0


# ---------------------------------------------------------------- ranks of one launch


def launch_rank(argv: list[str]) -> int:
    """Under ``accelerate launch``: rank 0 composes, validates and freezes; every rank executes the file.

    Rank 0 sends the run dir (or the news that the command line was refused) to the others, so a
    config error exits every rank with status 2 and is printed once.
    """
    import torch
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    # The first PartialState fixes the backend: gloo on CPU (no CUDA, or device=cpu), else nccl.
    state = PartialState(cpu="device=cpu" in argv or not torch.cuda.is_available())
    message: list = [None]
    if state.is_main_process:
        try:
            message = [str(frozen_run(argv, lock=False))]  # rank 0 locks the dir when it executes
        except UserError as e:
            message = [("refused", fail(e))]
    broadcast_object_list(message, from_process=0)
    if isinstance(message[0], tuple):
        return message[0][1]
    if not state.is_main_process:
        logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="[rank %(process)d][%(name)s] %(message)s")
    return execute(Path(message[0]))


# ---------------------------------------------------------------- sweeps and printing (Hydra runs them)


def check_sweep(argv: list[str]) -> list[str]:
    """Check a sweep before Hydra starts it: its first values composed and validated, its plugins
    present, its dir writable. Returns Hydra's command line (keys the schema has but a preset's YAML
    leaves out become ``++key``, so Hydra's struct mode takes what validation accepted)."""
    from engine.config.record import make_run_dir
    from engine.sweep.spec import check_plugins

    added: set[str] = set()
    composed = compose_checked(argv, added=added)
    validate(composed.raw)
    rest = use_config_dirs(argv)
    if problems := check_plugins(rest, CONF_DIR, composed.raw.get("sweep") or {}):
        raise ConfigError(problems)
    make_run_dir(Path(composed.hydra["sweep_dir"]), "hydra.sweep.dir")
    return [f"++{a}" if not a.startswith(("+", "~", "-")) and a.split("=", 1)[0] in added else a for a in rest]


def hydra_main(argv: list[str]) -> int:
    """Hand the command line to Hydra (sweeps, ``--cfg``, ``--info``): its jobs call ``run_sweep_job``."""
    import hydra

    sys.argv = [sys.argv[0], *argv]

    @hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
    def task(cfg) -> float | None:
        return run_sweep_job(cfg)

    try:
        task()
    finally:
        from engine.sweep.__main__ import after_multirun

        code = after_multirun()
    return code


def run_sweep_job(cfg) -> float | None:
    """One job of a multirun: Hydra's launcher composed it; validate once, freeze, execute the file.

    A failed job is recorded (``sweep_job.json``) and the sweep goes on; the entry point exits 1 at
    the end if any failed. A stop by signal or Ctrl-C (exit 128+n) still ends the sweep. The
    return value is the job's ``sweep.objective`` for Hydra's sweeper; an Optuna sweeper learns
    of a failed job by an exception, not a NaN.
    """
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from engine.config.job import keep_local_paths_out
    from engine.config.record import freeze
    from engine.pipeline import execute as run_stages
    from engine.sweep.job import run_job

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    keep_local_paths_out(run_dir, hc.output_subdir)
    raw = OmegaConf.to_container(cfg, resolve=True)
    raw["recipe"] = hc.runtime.choices.get("recipe")

    def work() -> None:
        freeze(validate(raw), run_dir)
        run_stages(run_dir)

    try:
        objective = (raw.get("sweep") or {}).get("objective")
        tell = "optuna" in str(hc.sweeper.get("_target_"))
        return run_job(run_dir, list(hc.overrides.task), objective=objective, work=work, raise_failure=tell)
    except UserError as e:  # only a stop gets here: the sweep ends with the job's exit status
        sys.exit(fail(e))
    return None
