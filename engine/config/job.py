"""What Hydra does around a job (its config node, the log file, the .hydra/ record), for a run
that was composed once and is not handed to ``@hydra.main`` (which would compose it again)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from engine.config.composition import Composed
from engine.files import shown_text, write_text_atomic


def start_job(composed: Composed, run_dir: Path) -> None:
    """What Hydra does around a job, without composing again: its config node, the log file,
    the .hydra/ record (config, hydra settings, the command line's overrides) and env_set."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.utils import configure_log
    from hydra.types import RunMode
    from omegaconf import OmegaConf, open_dict, read_write

    cfg = composed.cfg
    with read_write(cfg.hydra), open_dict(cfg.hydra):
        cfg.hydra.runtime.output_dir = str(run_dir.absolute())
        cfg.hydra.mode = RunMode.RUN
    HydraConfig.instance().set_config(cfg)
    configure_log(cfg.hydra.job_logging, cfg.hydra.verbose)
    for key, value in (cfg.hydra.job.env_set or {}).items():
        os.environ[str(key)] = str(value)
    subdir = cfg.hydra.output_subdir
    if subdir is not None:
        record = run_dir / str(subdir)
        record.mkdir(parents=True, exist_ok=True)
        task = {k: v for k, v in OmegaConf.to_container(cfg, resolve=False).items() if k != "hydra"}
        OmegaConf.save(OmegaConf.create(task), record / "config.yaml")
        OmegaConf.save(OmegaConf.create({"hydra": OmegaConf.to_container(cfg.hydra, resolve=False)}), record / "hydra.yaml")
        OmegaConf.save(cfg.hydra.overrides.task, record / "overrides.yaml")
    keep_local_paths_out(run_dir, str(subdir) if subdir is not None else None)


def keep_local_paths_out(run_dir: Path, output_subdir: str | None) -> None:
    """What Hydra's bookkeeping writes into the run dir itself, with local paths shown as
    ``engine.files.shown_text`` does.

    The record of Hydra's own settings (``.hydra/hydra.yaml``: the working dir, the output dir,
    the config search path) is rewritten once, before any stage runs; the log file
    (``<job>.log``, where other libraries' log lines name the files they read and write) gets a
    formatter that does the same to every line. Why not drop them: ``.hydra/`` keeps the command
    line (overrides.yaml) and the composed config as typed, and the log what libraries said. The
    terminal is left as it is: there a local path is what the user needs.
    """
    record = run_dir / output_subdir / "hydra.yaml" if output_subdir else None
    if record is not None and record.is_file():
        write_text_atomic(record, shown_text(record.read_text(), run_dir))
    here = os.path.realpath(run_dir)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler) and os.path.dirname(os.path.realpath(handler.baseFilename)) == here:
            handler.setFormatter(ShownPathsFormatter(handler.formatter, run_dir))


class ShownPathsFormatter(logging.Formatter):
    """Another formatter's lines with local paths shown (``engine.files.shown_text``)."""

    def __init__(self, inner: logging.Formatter | None, run_dir: Path):
        super().__init__()
        self.inner = inner or logging.Formatter()
        self.run_dir = run_dir

    def format(self, record: logging.LogRecord) -> str:
        return shown_text(self.inner.format(record), self.run_dir)
