"""The run record: ``run_dir/config.yaml``, written once per run, read by whatever executes it.

Resolve once, freeze, then launch: the process that composed and validated the run decides
whether it resumes (a changed config is refused before anything is overwritten) and writes
config.yaml; the pipeline, every rank under ``accelerate launch`` and every sweep job read that
file back (``read``) instead of composing again, so they all run exactly what was recorded.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from omegaconf import OmegaConf

from engine.config.composition import register_resolvers
from engine.config.validation import parse
from engine.context import RunConfig
from engine.errors import ConfigError
from engine.files import portable_config, write_text_atomic
from engine.stages import STAGES
from engine.train import checkpoint as ckpt_io

RECORD = "config.yaml"
START_OVER = "to change them, start over with train.resume=never (old checkpoints go to superseded/) or use a new hydra.run.dir"


def claim_run_dir(run_dir: Path) -> Path:
    """Create and lock a single run's dir before anything is written into it."""
    from engine.lock import acquire

    path = make_run_dir(run_dir, "hydra.run.dir")
    try:
        acquire(path)
    except OSError as e:
        raise ConfigError(f"hydra.run.dir: cannot write in {run_dir} ({e.strerror}); choose a writable directory") from None
    return path


def make_run_dir(run_dir: Path, key: str) -> Path:
    """Create ``run_dir`` (returned absolute) or say why it cannot be (a file in the way, no permission, /proc ...)."""
    path = run_dir.absolute()
    existing = next(p for p in (path, *path.parents) if p.exists() or p == p.parent)
    if existing.exists() and not existing.is_dir():
        raise ConfigError(
            f"{key}: {run_dir} cannot be a directory: {existing} is a file; choose another path, e.g. {key}=outputs/my_run"
        )
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(
            f"{key}: cannot create {run_dir} ({e.strerror}, under {existing}); choose a directory you can write, "
            f"e.g. {key}=outputs/my_run"
        ) from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}: {run_dir} is not writable by this user; choose another directory")
    return path


def trains(stages: list[str]) -> bool:
    """Whether a stage of this run writes trained weights (the registry's ``trains`` trait)."""
    return any(s in STAGES and "trains" in STAGES.get(s).traits for s in stages)


def freeze(cfg: RunConfig, run_dir: Path) -> ckpt_io.Checkpoint | None:
    """Decide resume before anything is written, then write config.yaml (one process: rank 0).

    A checkpoint of a different config is refused (``train.resume=auto``) or checked key by key
    (``force``) before the old record is touched; half-written checkpoints are removed and
    ``resume=never`` moves the old attempt aside. Returns the checkpoint training continues from.
    """
    run_dir = Path(run_dir)
    training = trains(cfg.stages)
    mode = cfg.train.resume
    ckpt = ckpt_io.resume_checkpoint(run_dir, is_main=True) if training and mode != "never" else None
    changed = _changed(ckpt, cfg.raw)
    if changed and mode == "force":
        refused = ckpt_io.force_refusals(ckpt.state.get("config", {}), ckpt_io.hashed_config(cfg.raw))
        if refused:
            raise ConfigError([*refused, START_OVER])
    if changed and mode == "auto":
        diff = ckpt_io.config_diff(ckpt.state.get("config", {}), ckpt_io.hashed_config(cfg.raw))
        shown = "; ".join(diff[:6]) + (f"; and {len(diff) - 6} more" if len(diff) > 6 else "")
        raise ConfigError(
            f"train.resume: {run_dir} holds checkpoint step-{ckpt.step} of a different config "
            f"({shown or 'hash differs'}). Resuming would mix two trainings. Re-run with the original "
            "settings, or add train.resume=force to continue with the new ones, or train.resume=never "
            "to start over (the old checkpoints are moved to superseded/), or use a new hydra.run.dir."
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    if training:
        for tmp in ckpt_io.checkpoints_dir(run_dir).glob(".tmp-*"):
            print(f"[engine] removing incomplete checkpoint {tmp.name} (a crash interrupted its write)", flush=True)
            shutil.rmtree(tmp, ignore_errors=True)
    if training and mode == "never":
        ckpt_io.supersede(run_dir)
    elif ckpt is not None:
        why = " (train.resume=force: config changed, the new values apply from here)" if changed else ""
        print(f"[engine] resuming from {ckpt.path} (step {ckpt.step}){why}", flush=True)
    write(cfg.raw, run_dir)
    return None if mode == "never" else ckpt


def _changed(ckpt: ckpt_io.Checkpoint | None, raw: dict) -> bool:
    # A checkpoint written before config hashes were portable holds the hash of the local paths.
    same = (ckpt_io.config_hash(raw), ckpt_io.config_hash(raw, portable=False))
    return ckpt is not None and ckpt.state.get("config_hash") not in same


def write(raw: dict, run_dir: Path) -> Path:
    """config.yaml, sample paths back as ``${sample:NAME}`` (the record resolves wherever it is read);
    an earlier, different record of this run dir is kept beside it with its time."""
    path = run_dir / RECORD
    new = OmegaConf.to_yaml(OmegaConf.create(portable_config(raw)))
    if path.exists() and path.read_text() != new:
        path.rename(run_dir / f"config.{time.strftime('%Y%m%d-%H%M%S')}.yaml")
    write_text_atomic(path, new)
    return path


def read(run_dir: Path) -> RunConfig:
    """The frozen run of ``run_dir`` as its ``RunConfig`` (schemas only; see ``validate.parse``)."""
    path = Path(run_dir) / RECORD
    if not path.is_file():
        raise ConfigError(f"{path}: missing; a run is executed from the config.yaml its command line froze")
    register_resolvers()
    return parse(OmegaConf.to_container(OmegaConf.load(path), resolve=True))
