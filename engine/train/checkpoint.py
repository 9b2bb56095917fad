"""Training checkpoints that survive any crash, and what a resume compares (the config identity).

The resume decision itself (same config? force? never?) is taken once, before config.yaml is
written, by engine/config/record.py with the functions here.

A checkpoint is ``run_dir/checkpoints/step-K/``: the trainable weights (safetensors), the
optimizer and scheduler state, every rank's RNG states, the data position and a hash of
the config that shaped the math. Why this layout and not ``accelerator.save_state``: we
must know that a checkpoint is *complete* and *ours* before trusting it.

- Complete: files go to ``checkpoints/.tmp-step-K/``, each is fsynced, ``state.json`` (with
  a manifest of file sizes and sha256 checksums) is written last, then the directory is
  renamed to ``step-K`` (atomic on POSIX) and the parent fsynced. A crash leaves either no
  ``step-K`` or a whole one; leftover ``.tmp-*`` dirs are never read and are removed at the
  next start.
- Intact: a disk, a copy or a person can still damage a whole checkpoint later without
  changing its size. Resume checks every file against its recorded size and checksum; a
  damaged checkpoint is reported by name, moved to ``damaged-step-K`` and the previous one
  is used (see ``resume_checkpoint``).
- Ours: tensors load with safetensors and everything else with
  ``torch.load(weights_only=True)``, which refuses arbitrary pickled objects.
- Sharded (FSDP/DeepSpeed): no rank holds the whole weights or optimizer state, so every rank
  writes its shards with accelerate's ``save_state`` into ``.tmp-step-K/accelerate/``; rank 0
  then adds the scheduler, RNG states and manifest (covering every shard file) and renames as
  above. Same completeness and checksum guarantees; those files are accelerate's formats.
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

from engine.errors import ConfigError, UserError
from engine.files import fsync_dir as _fsync_dir
from engine.files import fsync_file as _fsync
from engine.files import portable_config, write_text_atomic

FILES = ("trainable.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt")
SHARDED = "accelerate"
"""Sub-dir of an FSDP/DeepSpeed run's checkpoint: accelerate's save_state output (every rank's shards)."""
STEP_DIR = re.compile(r"^step-(\d+)$")

# Keys that do not change what training computes: changing them does not block resume.
NOT_HASHED = [
    ("recipe",),
    ("stages",),
    ("eval",),
    ("sweep",),
    ("data", "cache"),
    ("data", "num_proc"),
    ("train", "loggers"),
    ("train", "plot"),
    ("train", "log_every"),
    ("train", "resume"),
    ("train", "save_every"),
    ("train", "keep_last"),
    ("train", "final_adapter"),
]


# ---------------------------------------------------------------- config identity


def hashed_config(raw: dict, *, portable: bool = True) -> dict:
    """The resolved config minus the keys that do not change the math (see NOT_HASHED).

    Portable (packaged sample files as ``${sample:NAME}``, as config.yaml holds them): the same
    run hashes the same wherever engine is installed, and state.json holds no local path.
    """
    out = portable_config(raw) if portable else copy.deepcopy(raw)
    for path in NOT_HASHED:
        node = out
        for key in path[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(path[-1], None)
    return out


def config_hash(raw: dict, *, portable: bool = True) -> str:
    text = json.dumps(hashed_config(raw, portable=portable), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def changed_keys(old: dict, new: dict, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(full key, old value, new value) for every leaf that differs between two nested configs."""
    out = []
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key, "<unset>"), new.get(key, "<unset>")
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += changed_keys(a, b, f"{name}.")
        elif a != b:
            out.append((name, a, b))
    return out


def config_diff(old: dict, new: dict) -> list[str]:
    """Human-readable differences between two nested configs: 'train.lr: 0.0003 -> 0.001'."""
    return [f"{key}: {a!r} -> {b!r}" for key, a, b in changed_keys(old, new)]


# What train.resume=force can change: the loop re-applies these after restoring a checkpoint
# (optimizer hyper-parameters, a schedule rebuilt for the new length) or builds them afresh
# at every start (loss, precision, speed switches). Every other hashed key is refused.
FORCE_CAN_CHANGE = (
    "train.lr",
    "train.weight_decay",
    "train.betas",
    "train.warmup_steps",
    "train.schedule",
    "train.max_steps",
    "train.epochs",
    "train.max_grad_norm",
    "train.eval_every",
    "train.eval_batches",
    "train.metric",
    "train.patience",
    "train.min_delta",
    "train.keep_freed_memory",
    "train.fused_ops",
    "train.compile",
    "loss",
    "precision",
    "device",
    "plugins",
    "model.gradient_checkpointing",
    "model.attn_implementation",
    "adapter.dropout",
    "adapter.fused",
    "data.preview",
)

# Why the others cannot be honoured, by the first matching prefix.
_FORCE_REFUSES = (
    ("train.micro_batch_size", "the saved data position counts micro-batches of the old size"),
    ("train.grad_accum", "the saved data position and step count assume the old accumulation"),
    ("train.optimizer", "the saved optimizer state belongs to the old optimizer"),
    ("seed", "the data order depends on it: the saved data position would point at other examples"),
    ("data", "it changes the training examples or their order: the saved data position would point at other examples"),
    ("model", "it changes the model: the checkpoint's weights and optimizer state would not fit"),
    ("quantization", "it changes the base weights the adapter was trained on"),
    ("adapter", "it changes which parameters train or their shapes: the checkpoint would not fit"),
)


def force_refusals(old: dict, new: dict) -> list[str]:
    """One message per changed key that ``train.resume=force`` cannot honour (see FORCE_CAN_CHANGE)."""
    out = []
    for key, a, b in changed_keys(old, new):
        if any(key == k or key.startswith(f"{k}.") for k in FORCE_CAN_CHANGE):
            continue
        why = next((w for k, w in _FORCE_REFUSES if key == k or key.startswith(f"{k}.")), "resume cannot re-apply it")
        out.append(f"{key}: {a!r} -> {b!r} cannot change on resume, even with train.resume=force: {why}")
    return out


# ---------------------------------------------------------------- finding checkpoints


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int
    state: dict


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def _step_dirs(run_dir: Path) -> list[tuple[int, Path]]:
    """Every ``step-K`` dir, oldest first (whatever its contents)."""
    root = checkpoints_dir(run_dir)
    found = []
    for d in root.iterdir() if root.is_dir() else []:
        m = STEP_DIR.match(d.name)
        if m and d.is_dir():
            found.append((int(m.group(1)), d))
    return sorted(found)


def _manifest(d: Path, step: int) -> dict:
    """state.json of step-K (raises ValueError if it is unreadable or not step-K's)."""
    try:
        state = json.loads((d / "state.json").read_text())
    except OSError as e:
        raise ValueError(f"state.json cannot be read ({e.strerror})") from None
    if not isinstance(state, dict) or state.get("step") != step or not isinstance(state.get("files"), dict):
        raise ValueError("state.json is not a checkpoint manifest")
    return state


def _recorded(entry) -> tuple[int, str | None]:
    """(size, sha256) of a manifest entry; checkpoints written before checksums record a size only."""
    return (entry["size"], entry["sha256"]) if isinstance(entry, dict) else (entry, None)


def _problem(d: Path, files: dict, check_hash: bool) -> str | None:
    """What is wrong with a checkpoint's files, or None: sizes always, checksums if asked."""
    for name, entry in files.items():
        size, digest = _recorded(entry)
        path = d / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {size} were written"
        if check_hash and digest is not None and sha256_file(path) != digest:
            return f"{name} checksum mismatch"
    return None


def complete_checkpoints(run_dir: Path) -> list[Checkpoint]:
    """Complete checkpoints, oldest first: named step-K, state.json readable, sizes as recorded.

    Cheap (no checksums): for rotation and listing. Resume uses ``resume_checkpoint``.
    """
    found = []
    for step, d in _step_dirs(run_dir):
        try:
            state = _manifest(d, step)
            ok = _problem(d, state["files"], check_hash=False) is None
        except (ValueError, KeyError, TypeError):
            ok = False
        if ok:
            found.append(Checkpoint(d, step, state))
    return found


def latest_checkpoint(run_dir: Path) -> Checkpoint | None:
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def verify(ckpt: Checkpoint) -> str | None:
    """What is damaged in a checkpoint (file, and why), or None when sizes and checksums match."""
    try:
        return _problem(ckpt.path, ckpt.state["files"], check_hash=True)
    except (KeyError, TypeError):
        return "state.json is not a checkpoint manifest"


def resume_checkpoint(run_dir: Path, *, is_main: bool) -> Checkpoint | None:
    """The newest checkpoint whose files all match their recorded sizes and checksums.

    Why not the newest by name: a checkpoint can be damaged after it was written (disk, copy,
    an editor) without changing its size, and resuming from it would train on silently wrong
    weights. Each damaged one newer than the one used is reported and, by the main process,
    moved to ``damaged-step-K`` (kept for inspection; a fresh step-K can be written again).
    When checkpoints exist but none is usable, starting from step 0 would silently throw the
    run away: that is refused (ConfigError) with what to do instead.
    """
    damaged = []
    for step, d in reversed(_step_dirs(run_dir)):
        try:
            ckpt = Checkpoint(d, step, _manifest(d, step))
            why = verify(ckpt)
        except ValueError as e:
            why = str(e)
        if why is None:
            _set_aside(damaged, is_main, using=f"step-{step}")
            return ckpt
        damaged.append((d, why))
    if damaged:
        listed = "; ".join(f"{d.name}: {why}" for d, why in damaged)
        raise ConfigError(
            f"train.resume: every checkpoint in {checkpoints_dir(run_dir)} is damaged ({listed}), so this run cannot "
            "continue. Start over with train.resume=never (the old checkpoints are moved to superseded/) "
            "or use a new hydra.run.dir."
        )
    return None


def _set_aside(damaged: list[tuple[Path, str]], is_main: bool, using: str) -> None:
    for d, why in damaged:
        moved = d.with_name(f"damaged-{d.name}")
        if is_main:
            print(f"[engine] checkpoint {d.name} is damaged: {why}; using {using} ({d.name} moved to {moved})", flush=True)
            shutil.rmtree(moved, ignore_errors=True)
            os.replace(d, moved)


def supersede(run_dir: Path, names: tuple[str, ...] = ("checkpoints", "train_log.jsonl")) -> None:
    """train.resume=never: move the old attempt's training files aside, never delete them."""
    olds = [run_dir / name for name in names if (run_dir / name).exists()]
    if not olds:
        return
    dest = run_dir / "superseded" / time.strftime("%Y%m%d-%H%M%S")
    dest.mkdir(parents=True, exist_ok=True)
    for p in olds:
        p.rename(dest / p.name)
    print(f"[engine] train.resume=never: moved the previous {', '.join(names)} to {dest}", flush=True)


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


def staging_dir(run_dir: Path, step: int) -> Path:
    """Where step-K is assembled before the rename that makes it complete."""
    return checkpoints_dir(run_dir) / f".tmp-step-{step}"


def clear_staging(run_dir: Path, step: int) -> Path:
    """An empty staging dir for step-K (rank 0, before any rank writes into it)."""
    tmp = staging_dir(run_dir, step)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def write_checkpoint(
    run_dir: Path,
    step: int,
    *,
    tensors: dict | None,
    optimizer: dict | None,
    scheduler: dict,
    rng: list[dict],
    state: dict,
    staged: bool = False,
) -> Path:
    """Write step-K atomically (rank 0 only). Returns its path; an existing step-K is kept.

    ``staged``: the staging dir already holds accelerate's ``save_state`` output in ``SHARDED``
    (FSDP/DeepSpeed: every rank wrote its shards there), so ``tensors`` and ``optimizer`` are
    None; the scheduler, RNG states and manifest are added and the whole dir renamed as usual.
    """
    import torch
    from safetensors.torch import save_file

    root = checkpoints_dir(run_dir)
    final = root / f"step-{step}"
    if final.exists():
        shutil.rmtree(staging_dir(run_dir, step), ignore_errors=True)
        return final
    tmp = staging_dir(run_dir, step) if staged else clear_staging(run_dir, step)
    if tensors is not None:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp / FILES[0]))
    if optimizer is not None:
        torch.save(optimizer, tmp / FILES[1])
    crash_point("checkpoint", step)
    torch.save(scheduler, tmp / FILES[2])
    torch.save({"ranks": rng}, tmp / FILES[3])
    files = _synced_manifest(tmp)
    write_text_atomic(tmp / "state.json", json.dumps({**state, "step": step, "files": files}, indent=1, default=str))
    _fsync_dir(tmp)
    os.replace(tmp, final)
    _fsync_dir(root)
    return final


def _synced_manifest(tmp: Path) -> dict:
    """fsync every file under ``tmp`` and record its size and sha256 (relative path -> entry)."""
    files = {}
    for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
        _fsync(path)
        files[path.relative_to(tmp).as_posix()] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    for d in sorted({p.parent for p in tmp.rglob("*")} - {tmp}):
        _fsync_dir(d)
    return files


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks (checkpoints can be gigabytes)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def load_checkpoint(ckpt: Checkpoint) -> dict:
    """Tensors via safetensors, the rest with weights_only=True: nothing but our own data loads.

    A checkpoint of an FSDP/DeepSpeed run has ``sharded_dir`` (for accelerate's ``load_state``)
    instead of ``tensors`` and ``optimizer``.
    """
    import torch
    from safetensors.torch import load_file

    path = ckpt.path
    try:
        data = {
            "scheduler": torch.load(path / FILES[2], weights_only=True),
            "rng": torch.load(path / FILES[3], weights_only=True)["ranks"],
            "state": ckpt.state,
        }
        if (path / SHARDED).is_dir():
            return {**data, "sharded_dir": path / SHARDED}
        return {
            **data,
            "tensors": load_file(str(path / FILES[0])),
            "optimizer": torch.load(path / FILES[1], weights_only=True, map_location="cpu"),
        }
    except Exception as e:  # safetensors/pickle errors of a file damaged after it was verified
        raise UserError(
            f"checkpoint {path} cannot be read ({type(e).__name__}: {str(e)[:200]}); move it aside or start "
            "over with train.resume=never"
        ) from None


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
