"""Schema of the ``train`` group (no heavy imports: validation runs before anything loads)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from engine.registry import Strict


class TrainSpec(Strict):
    max_steps: int | None = Field(60, ge=1)
    """Optimizer steps (null: run ``epochs`` whole passes)."""
    epochs: float | None = Field(None, gt=0)
    """Passes over the training split, used when max_steps is null."""
    micro_batch_size: int = Field(4, ge=1)
    """Examples per forward pass (per process)."""
    grad_accum: int = Field(2, ge=1)
    """Micro-batches per optimizer step; effective batch = micro x accum x processes."""
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"] = "adamw"
    """adamw (torch); the bitsandbytes 8-bit/paged variants save optimizer memory on CUDA only."""
    lr: float = Field(3e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = Field(5, ge=0)
    schedule: Literal["linear", "cosine", "constant"] = "cosine"
    max_grad_norm: float | None = Field(1.0, gt=0)
    """Clip the global gradient norm to this (null: no clipping)."""
    log_every: int = Field(5, ge=1)
    """Steps between progress-bar loss updates (train_log.jsonl gets every step)."""

    eval_every: int | None = Field(None, ge=1)
    """Steps between validation-loss passes on the validation split (null: none)."""
    eval_batches: int | None = Field(None, ge=1)
    """Cap on validation micro-batches per pass (null: the whole split)."""
    metric: Literal["val_loss", "train_loss"] = "val_loss"
    """What best-checkpoint tracking and early stopping watch at each evaluation (lower is better);
    train_loss is the mean training loss since the previous evaluation."""
    patience: int | None = Field(None, ge=1)
    """Stop after this many evaluations without improvement of ``metric`` (null: never)."""
    min_delta: float = Field(0.0, ge=0)
    """An improvement smaller than this does not reset patience."""
    final_adapter: Literal["last", "best"] = "last"
    """Which weights become run_dir/adapter (and are evaluated): the last step's or the best ``metric``'s."""

    save_every: int | None = Field(20, ge=1)
    """Steps between checkpoints (a checkpoint is also written at the end and on SIGTERM/Ctrl-C)."""
    keep_last: int = Field(2, ge=1)
    """Checkpoints kept (older ones are deleted; the best one is always kept)."""
    resume: Literal["auto", "force", "never"] = "auto"
    """auto: continue from the latest intact checkpoint in the run dir (sizes and sha256 checked;
    a damaged one is reported and the one before it used), refusing if the config changed;
    force: continue with the changed config: the optimizer's lr, weight_decay and betas and the
    schedule (warmup_steps, schedule, max_steps/epochs) are re-applied after restoring, the loss,
    precision, device, grad clipping, evaluation and speed switches take effect as usual; changes
    that cannot be honoured mid-run are refused (model, quantization, adapter except dropout/fused,
    data except preview, seed, micro_batch_size, grad_accum, optimizer), see
    engine/train/checkpoint.py FORCE_CAN_CHANGE; never (or false): start over, moving the old
    checkpoints and train_log.jsonl into run_dir/superseded/<time>/."""

    loggers: list[Literal["tensorboard", "mlflow", "wandb"]] = []
    """Extra metric sinks besides train_log.jsonl: tensorboard, mlflow (local store), wandb (offline)."""
    plot: bool = True
    """Write loss.png (loss and learning rate per step) in the run dir at the end."""
    keep_freed_memory: bool = True
    """On a CPU (Linux/glibc): reuse freed big buffers instead of returning them to the OS each
    step (fewer page faults, ~8% faster packed training here; RSS stays at its peak)."""
    fused_ops: bool = True
    """On a CPU: RMSNorm (Llama family, frozen weight) and rotary embeddings as single autograd
    nodes with hand-written backwards (engine/fused_ops.py): the same functions, 2-3x cheaper."""
    compile: bool = False
    """torch.compile each decoder block's MLP and norms (one graph, reused by every layer): fused
    elementwise kernels, paid for by a one-off compile of ~1 min (bench/RESULTS.md has the numbers)."""

    @field_validator("resume", mode="before")
    @classmethod
    def _resume_bool(cls, v):
        # YAML/Hydra turn `train.resume=false` into a bool: accept the natural spelling.
        return {True: "auto", False: "never"}.get(v, v) if isinstance(v, bool) else v

    @field_validator("loggers")
    @classmethod
    def _installed(cls, v):
        import importlib.util

        for name in v:
            if importlib.util.find_spec(name) is None:  # the logger's name is its package's name
                raise ValueError(
                    f"logger '{name}' needs the {name} package: pip install {name} (or remove it from train.loggers)"
                )
        return v

    @model_validator(mode="after")
    def _consistent(self):
        if self.max_steps is None and self.epochs is None:
            raise ValueError("set train.max_steps or train.epochs (both are null)")
        if self.final_adapter == "best" and self.eval_every is None:
            raise ValueError("train.final_adapter=best needs train.eval_every (how often the metric is measured)")
        if self.patience is not None and self.eval_every is None:
            raise ValueError("train.patience needs train.eval_every (early stopping is checked at each evaluation)")
        return self


def optimizer_problem(optimizer: str, device: str) -> str | None:
    """Why ``optimizer`` cannot run on ``device`` (resolved: cuda, cpu, mps), or None when it can.

    bitsandbytes' 8-bit and paged AdamW have CUDA kernels only. One rule, applied twice: by
    validation before anything loads (engine/checks.py) and by the optimizer's builder, which
    sees the device the run really got.
    """
    if optimizer == "adamw" or device == "cuda":
        return None
    return f"train.optimizer: {optimizer} (bitsandbytes) needs a CUDA GPU; this run is on {device}: use train.optimizer=adamw"
