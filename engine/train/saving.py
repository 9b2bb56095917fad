"""A running loop's checkpoints (write, resume) and its final weights, for every loop here.

The files and their guarantees (atomic, checksummed, config-hashed) are checkpoint.py's; this
module moves a live run's tensors, optimizer, scheduler, RNG states and progress in and out of
them, and writes the adapter dir at the end.
"""

from __future__ import annotations

import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import TypeVar

import torch

from engine.data.templates import save_template
from engine.errors import ConfigError, UserError
from engine.files import shown_path
from engine.train import checkpoint as ckpt_io
from engine.train.job import Job, Progress, Run
from engine.train.optim import reapply_hyperparameters

P = TypeVar("P", bound=Progress)


def uses_accelerate_state(acc) -> bool:
    """FSDP/DeepSpeed: no rank holds whole weights or optimizer state; checkpoints go through
    accelerate's save_state/load_state (every rank writes and reads its own shards)."""
    return acc.distributed_type.value in ("FSDP", "DEEPSPEED")


def trainable(acc, model) -> dict[str, torch.Tensor]:
    """The trainable tensors by name, as the unwrapped model names them (what a checkpoint holds)."""
    return {n: p for n, p in acc.unwrap_model(model).named_parameters() if p.requires_grad}


# ---------------------------------------------------------------- writing


def save_checkpoint(run: Run, protect: set[int]) -> None:
    """Collective: gather every rank's RNG state (and shards); rank 0 writes step-K, then rotates
    (keeping ``train.keep_last`` and the steps in ``protect``)."""
    job, acc, state = run.job, run.job.accelerator, run.state
    rng = ckpt_io.rng_state()
    if acc.num_processes > 1:
        from accelerate.utils import gather_object

        rngs = gather_object([rng])
    else:
        rngs = [rng]
    if run.sharded:
        if acc.is_main_process:
            ckpt_io.clear_staging(job.run_dir, state.step)
        acc.wait_for_everyone()
        acc.save_state(str(ckpt_io.staging_dir(job.run_dir, state.step) / ckpt_io.SHARDED))
        acc.wait_for_everyone()
    if acc.is_main_process:
        ckpt_io.write_checkpoint(
            job.run_dir,
            state.step,
            tensors=None if run.sharded else trainable(acc, run.model),
            optimizer=None if run.sharded else run.optimizer.state_dict(),
            scheduler=run.scheduler.state_dict(),
            rng=rngs,
            state={
                **asdict(state),
                "config_hash": ckpt_io.config_hash(job.config),
                "config": ckpt_io.hashed_config(job.config),
                "processes": acc.num_processes,
                "time": time.strftime("%Y-%m-%d %H:%M:%S"),
            },
            staged=run.sharded,
        )
        ckpt_io.rotate(job.run_dir, job.train.keep_last, protect)
    acc.wait_for_everyone()


# ---------------------------------------------------------------- resuming


def resume(job: Job, model, optimizer, scheduler, *, sharded: bool, steps: int, fresh: P) -> tuple[P, int | None]:
    """Continue from the newest intact checkpoint (unless train.resume=never), then re-apply this
    config's optimizer hyper-parameters and schedule (train.resume=force may have changed them).

    Returns the progress to continue from (``fresh`` when starting) and the step resumed from.
    The RNG states are restored too, so the next step draws what an uninterrupted run would.
    """
    state, resumed_from = fresh, None
    found = _resume_point(job)
    if found is not None:
        state = _restore(found, job.accelerator, model, optimizer, scheduler, sharded, type(fresh))
        resumed_from = state.step
        if steps < state.step:
            raise ConfigError(
                f"train.max_steps: this run now has {steps} steps, but its checkpoint is at step {state.step}: "
                f"set train.max_steps to at least {state.step}, or start over with train.resume=never"
            )
    reapply_hyperparameters(optimizer, scheduler, job.train)
    return state, resumed_from


def _resume_point(job: Job) -> ckpt_io.Checkpoint | None:
    """The checkpoint to continue from (damaged ones reported and set aside by rank 0), or None."""
    if job.train.resume == "never":
        return None
    found = ckpt_io.resume_checkpoint(job.run_dir, is_main=job.is_main)
    job.accelerator.wait_for_everyone()
    return found


def _restore(found: ckpt_io.Checkpoint, acc, model, optimizer, scheduler, sharded: bool, kind: type[P]) -> P:
    data = ckpt_io.load_checkpoint(found)
    load_weights(acc, model, optimizer, data, sharded)
    scheduler.load_state_dict(data["scheduler"])
    rngs = data["rng"]
    if len(rngs) != acc.num_processes:
        warnings.warn(
            f"checkpoint was written by {len(rngs)} processes, now {acc.num_processes}: "
            "RNG streams differ from an uninterrupted run",
            stacklevel=1,
        )
    ckpt_io.set_rng_state(rngs[acc.process_index % len(rngs)])
    fields = kind.__dataclass_fields__
    return kind(**{k: v for k, v in data["state"].items() if k in fields})


def load_weights(acc, model, optimizer, data: dict, sharded: bool) -> None:
    """Trainable weights and (unless ``optimizer`` is None) optimizer state from a loaded
    checkpoint: ours, or accelerate's shards (collective)."""
    if ("sharded_dir" in data) != sharded:
        written, now = ("FSDP/DeepSpeed", "a plain") if "sharded_dir" in data else ("a plain", "an FSDP/DeepSpeed")
        raise UserError(
            f"checkpoint step-{data['state'].get('step')} was written by {written} run and this is {now} run: resume it "
            "with the accelerate launch config it was written with, or start over with train.resume=never"
        )
    if sharded:
        acc.load_state(str(data["sharded_dir"]))
        return
    own = trainable(acc, model)
    tensors = data["tensors"]
    if set(own) != set(tensors):
        diff = sorted(set(own) ^ set(tensors))[:3]
        raise UserError(
            f"checkpoint does not fit this model's trainable parameters (e.g. {diff}): the adapter or model "
            "changed; start over with train.resume=never or use a new hydra.run.dir"
        )
    with torch.no_grad():
        for name, p in own.items():
            p.copy_(tensors[name].to(p.device, p.dtype))
    if optimizer is not None:
        optimizer.load_state_dict(data["optimizer"])


def checkpoint_at(run_dir: Path, step: int) -> ckpt_io.Checkpoint:
    """The complete checkpoint of ``step`` (the best one, for ``train.final_adapter=best``)."""
    found = next((c for c in ckpt_io.complete_checkpoints(run_dir) if c.step == step), None)
    if found is None:  # set aside as damaged on resume, or deleted by hand
        raise UserError(
            f"train.final_adapter=best: the best step's checkpoint (step-{step}) is no longer in "
            f"{ckpt_io.checkpoints_dir(run_dir)}; keep the last weights instead with train.final_adapter=last"
        )
    return found


# ---------------------------------------------------------------- the final weights


def save_adapter(job: Job, model, *, sharded: bool) -> Path:
    """PEFT adapter dir (loadable with PeftModel.from_pretrained); the full model if no adapter."""
    acc = job.accelerator
    acc.wait_for_everyone()
    inner = acc.unwrap_model(model)
    state_dict = acc.get_state_dict(model) if sharded else None  # collective: every rank calls it
    out = job.run_dir / ("adapter" if hasattr(inner, "peft_config") else "model")
    if acc.is_main_process:
        with base_named(inner, job.model_spec):
            inner.save_pretrained(out, safe_serialization=True, **({"state_dict": state_dict} if sharded else {}))
        if out.name == "model":
            job.tokenizer.save_pretrained(out)
        save_template(out, job.data.template)  # what merge and serving render with (engine.data.templates)
    acc.wait_for_everyone()
    return out


@contextmanager
def base_named(model, model_spec):
    """PEFT writes where the base was loaded from into adapter_config.json and README.md: the HF
    cache snapshot of a hub model, our conversion cache for a packaged GGUF, always a local path.
    While saving, the base is named as the config names it (hub id, ``package:<pkg>/<file>``,
    a local dir as ``shown_path``) so the adapter dir can be shared; the loaded model is unchanged."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    loaded_from = getattr(base, "name_or_path", None)
    if not loaded_from:  # built from a config (tiny): nothing local to hide
        yield
        return
    name = _base_name(model_spec, str(loaded_from))
    configs = [c for c in getattr(model, "peft_config", {}).values() if c.base_model_name_or_path is not None]
    recorded = [c.base_model_name_or_path for c in configs]
    for c in configs:
        c.base_model_name_or_path = name
    base.name_or_path = base.config.name_or_path = name
    try:
        with warnings.catch_warnings():
            # PEFT looks the base up by that name to see whether its vocabulary was resized: a packaged
            # GGUF (package:<pkg>/<file>) or a hub id offline is nowhere it can look, and it says so.
            warnings.filterwarnings("ignore", message="Could not find a config file in", category=UserWarning)
            yield
    finally:
        for c, old in zip(configs, recorded, strict=True):
            c.base_model_name_or_path = old
        base.name_or_path = base.config.name_or_path = loaded_from


def _base_name(model_spec, loaded_from: str) -> str:
    typed = getattr(model_spec, "name_or_path", None)
    if typed and not Path(typed).expanduser().exists():
        return typed  # a hub id
    if getattr(model_spec, "package", None) and getattr(model_spec, "file", None):
        return f"package:{model_spec.package}/{model_spec.file}"
    return shown_path(typed or loaded_from)
