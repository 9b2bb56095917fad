"""Training checkpoints that survive any crash, and the resume decision for a run dir.

A checkpoint is ``run_dir/checkpoints/step-K/``: the trainable weights (safetensors), the
optimizer and scheduler state, every rank's RNG states, the data position and a hash of
the config that shaped the math. Why this layout and not ``accelerator.save_state``: we
must know that a checkpoint is *complete* and *ours* before trusting it.

- Complete: files go to ``checkpoints/.tmp-step-K/``, each is fsynced, ``state.json`` (with
  a manifest of file sizes) is written last, then the directory is renamed to ``step-K``
  (atomic on POSIX) and the parent fsynced. A crash leaves either no ``step-K`` or a whole
  one; leftover ``.tmp-*`` dirs are never read and are removed at the next start.
- Ours: tensors load with safetensors and everything else with
  ``torch.load(weights_only=True)``, which refuses arbitrary pickled objects.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import random
import re
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.errors import ConfigError
from engine.files import fsync_dir as _fsync_dir
from engine.files import fsync_file as _fsync
from engine.files import write_text_atomic

FILES = ("trainable.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt")
STEP_DIR = re.compile(r"^step-(\d+)$")

# Keys that do not change what training computes: changing them does not block resume.
NOT_HASHED = [
    ("recipe",),
    ("stages",),
    ("eval",),
    ("train", "loggers"),
    ("train", "plot"),
    ("train", "log_every"),
    ("train", "resume"),
    ("train", "save_every"),
    ("train", "keep_last"),
    ("train", "final_adapter"),
]


# ---------------------------------------------------------------- config identity


def hashed_config(raw: dict) -> dict:
    """The resolved config minus the keys that do not change the math (see NOT_HASHED)."""
    out = copy.deepcopy(raw)
    for path in NOT_HASHED:
        node = out
        for key in path[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(path[-1], None)
    return out


def config_hash(raw: dict) -> str:
    text = json.dumps(hashed_config(raw), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def config_diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Human-readable differences between two nested configs: 'train.lr: 0.0003 -> 0.001'."""
    out = []
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key, "<unset>"), new.get(key, "<unset>")
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_diff(a, b, f"{name}.")
        elif a != b:
            out.append(f"{name}: {a!r} -> {b!r}")
    return out


# ---------------------------------------------------------------- finding checkpoints


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int
    state: dict


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def complete_checkpoints(run_dir: Path) -> list[Checkpoint]:
    """Complete checkpoints, oldest first: named step-K, state.json readable, sizes as recorded."""
    root = checkpoints_dir(run_dir)
    found = []
    for d in root.iterdir() if root.is_dir() else []:
        m = STEP_DIR.match(d.name)
        if not m or not d.is_dir():
            continue
        try:
            state = json.loads((d / "state.json").read_text())
            ok = all((d / name).stat().st_size == size for name, size in state["files"].items())
        except (OSError, ValueError, KeyError):
            ok = False
        if ok and state.get("step") == int(m.group(1)):
            found.append(Checkpoint(d, int(m.group(1)), state))
    return sorted(found, key=lambda c: c.step)


def latest_checkpoint(run_dir: Path) -> Checkpoint | None:
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


# ---------------------------------------------------------------- the resume decision


def prepare_run_dir(cfg, run_dir: Path, accelerator) -> Checkpoint | None:
    """Decide resume before anything is written: compare the config first, then write config.yaml.

    Every rank checks (read-only, so all raise the same ConfigError); rank 0 then cleans up
    half-written checkpoints, moves an old attempt aside for ``resume=never`` and writes
    config.yaml. Returns the checkpoint training will continue from, if any.
    """
    from omegaconf import OmegaConf

    run_dir = Path(run_dir)
    trains = "train" in cfg.stages
    ckpt = latest_checkpoint(run_dir) if trains else None
    mode = cfg.train.resume
    if ckpt is not None and mode == "auto" and ckpt.state.get("config_hash") != config_hash(cfg.raw):
        diff = config_diff(ckpt.state.get("config", {}), hashed_config(cfg.raw))
        shown = "; ".join(diff[:6]) + (f"; and {len(diff) - 6} more" if len(diff) > 6 else "")
        raise ConfigError(
            f"train.resume: {run_dir} holds checkpoint step-{ckpt.step} of a different config "
            f"({shown or 'hash differs'}). Resuming would mix two trainings. Re-run with the original "
            "settings, or add train.resume=force to continue with the new ones, or train.resume=never "
            "to start over (the old checkpoints are moved to superseded/), or use a new hydra.run.dir."
        )
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        if trains:
            for tmp in checkpoints_dir(run_dir).glob(".tmp-*"):
                print(f"[engine] removing incomplete checkpoint {tmp.name} (a crash interrupted its write)", flush=True)
                shutil.rmtree(tmp, ignore_errors=True)
        if trains and mode == "never":
            _supersede(run_dir)
        elif ckpt is not None:
            why = " (train.resume=force: config changed)" if ckpt.state.get("config_hash") != config_hash(cfg.raw) else ""
            print(f"[engine] resuming from {ckpt.path} (step {ckpt.step}){why}", flush=True)
        cfg_path = run_dir / "config.yaml"
        new = OmegaConf.to_yaml(OmegaConf.create(cfg.raw))
        if cfg_path.exists() and cfg_path.read_text() != new:
            # Keep the record of what the earlier part of this run was trained with.
            cfg_path.rename(run_dir / f"config.{time.strftime('%Y%m%d-%H%M%S')}.yaml")
        write_text_atomic(cfg_path, new)
    accelerator.wait_for_everyone()
    return None if mode == "never" else ckpt


def _supersede(run_dir: Path) -> None:
    """train.resume=never: move the old attempt's training files aside, never delete them."""
    olds = [p for p in (checkpoints_dir(run_dir), run_dir / "train_log.jsonl") if p.exists()]
    if not olds:
        return
    dest = run_dir / "superseded" / time.strftime("%Y%m%d-%H%M%S")
    dest.mkdir(parents=True, exist_ok=True)
    for p in olds:
        p.rename(dest / p.name)
    print(f"[engine] train.resume=never: moved the previous checkpoints and train_log.jsonl to {dest}", flush=True)


# ---------------------------------------------------------------- RNG states


def rng_state() -> dict:
    """This process's RNG states in types torch.load(weights_only=True) accepts."""
    import numpy as np
    import torch

    np_state = np.random.get_state()
    state = {
        "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(_plain, np_state[2:])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import numpy as np
    import torch

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _plain(x):
    return x.item() if hasattr(x, "item") else x


# ---------------------------------------------------------------- writing


def crash_point(where: str, step: int) -> None:
    """Test hook: ``ENGINE_CRASH_AT=<where>:<step>`` SIGKILLs this process there.

    The crash-safety tests use it to die at exact points (after a step, in the middle of a
    checkpoint write); unset, it costs one dict lookup.
    """
    if os.environ.get("ENGINE_CRASH_AT") == f"{where}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def write_checkpoint(
    run_dir: Path,
    step: int,
    *,
    tensors: dict,
    optimizer: dict,
    scheduler: dict,
    rng: list[dict],
    state: dict,
) -> Path:
    """Write step-K atomically (rank 0 only). Returns its path; an existing step-K is kept."""
    import torch
    from safetensors.torch import save_file

    root = checkpoints_dir(run_dir)
    final = root / f"step-{step}"
    if final.exists():
        return final
    tmp = root / f".tmp-step-{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp / FILES[0]))
    _fsync(tmp / FILES[0])
    torch.save(optimizer, tmp / FILES[1])
    _fsync(tmp / FILES[1])
    crash_point("checkpoint", step)
    torch.save(scheduler, tmp / FILES[2])
    _fsync(tmp / FILES[2])
    torch.save({"ranks": rng}, tmp / FILES[3])
    _fsync(tmp / FILES[3])
    files = {name: (tmp / name).stat().st_size for name in FILES}
    write_text_atomic(tmp / "state.json", json.dumps({**state, "step": step, "files": files}, indent=1, default=str))
    _fsync_dir(tmp)
    os.replace(tmp, final)
    _fsync_dir(root)
    return final


def load_checkpoint(ckpt: Checkpoint) -> dict:
    """Tensors via safetensors, the rest with weights_only=True: nothing but our own data loads."""
    import torch
    from safetensors.torch import load_file

    return {
        "tensors": load_file(str(ckpt.path / FILES[0])),
        "optimizer": torch.load(ckpt.path / FILES[1], weights_only=True, map_location="cpu"),
        "scheduler": torch.load(ckpt.path / FILES[2], weights_only=True),
        "rng": torch.load(ckpt.path / FILES[3], weights_only=True)["ranks"],
        "state": ckpt.state,
    }


def rotate(run_dir: Path, keep_last: int, protect: set[int]) -> None:
    """Delete all but the newest ``keep_last`` checkpoints (and those in ``protect``).

    A doomed checkpoint is first renamed to .tmp-del-*, so a crash during deletion never
    leaves a partly deleted dir under a step-K name.
    """
    found = complete_checkpoints(run_dir)
    for ck in found[: max(0, len(found) - keep_last)]:
        if ck.step in protect:
            continue
        doomed = ck.path.with_name(f".tmp-del-{ck.path.name}")
        os.replace(ck.path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)


def truncate_log(path: Path, step: int) -> int:
    """Keep only train_log.jsonl records with step <= ``step`` (resume must not duplicate steps).

    A torn last line (killed mid-write) is dropped too. Returns how many records were kept.
    """
    if not path.exists():
        return 0
    kept = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] <= step:
            kept.append(line)
    write_text_atomic(path, "".join(f"{line}\n" for line in kept))
    return len(kept)


def describe(state: dict[str, Any]) -> str:
    return f"step {state.get('step')}, data position {state.get('data_position')}"
