"""What a training run is handed, and what it carries from step to step: plain, typed values.

``Job`` is what every loop here needs (the SFT loop in loop.py, GRPO in engine/rl/grpo.py):
the specs it reads, never the whole run config. ``TrainJob`` adds the loss. A stage builds
one from the run context; nothing below the stages reads the context.

``Progress`` is what a checkpoint carries besides tensors, ``Run`` what set-up hands to every
step and to the finish. No torch here: the stages import this module when a run is validated.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.registry import Spec
from engine.train.spec import TrainSpec

if TYPE_CHECKING:
    from accelerate import Accelerator

    from engine.data import DataBundle
    from engine.model import ModelSpec
    from engine.train.scaffold import Outputs


@dataclass(frozen=True, kw_only=True)
class Job:
    """What any training loop here needs, as plain values."""

    run_dir: Path
    """Where train_log.jsonl, checkpoints/ and adapter/ go."""
    accelerator: Accelerator
    model: Any
    """The model to train: the base with its adapter, or the whole model when adapter=none."""
    tokenizer: Any
    data: DataBundle
    """The prepared splits, their template and their batching options."""
    train: TrainSpec
    """Optimizer, schedule, length, evaluation, checkpoints, loggers and speed switches."""
    seed: int
    """Seeds torch and the data order."""
    model_spec: ModelSpec
    """How the config names the base: the saved adapter dir records that name, not a cache path."""
    config: dict
    """The resolved run config (as config.yaml holds it): each checkpoint records its hash, so
    resume refuses a changed config; the metric sinks record its values."""

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process


@dataclass(frozen=True, kw_only=True)
class TrainJob(Job):
    """One supervised run (engine/train/loop.py): a Job and the loss it minimises."""

    loss: Spec
    """The ``loss`` group's spec (``LOSSES.build`` makes the loss function)."""


@dataclass
class Progress:
    """Progress every loop's checkpoint carries besides tensors (each loop adds its own)."""

    step: int = 0
    data_position: int = 0
    """Units taken from the loop's stream (micro-batches, prompts): where resume continues."""


@dataclass
class TrainState(Progress):
    """The SFT loop's progress."""

    tokens: int = 0
    best: float | None = None
    best_step: int | None = None
    bad_evals: int = 0
    splits: int = 1
    """Each micro-batch is cut into this many pieces (doubles after a CUDA OOM)."""
    since_eval: float = 0.0
    since_eval_steps: int = 0
    stream: dict | None = None
    """Streamed data (data.streaming): the stream's exact position (file row, shuffle buffer, RNG),
    so a resumed run draws the rows an uninterrupted one would; None for map-style data."""


@dataclass(kw_only=True)
class Run:
    """What set-up hands to every step and to the finish (each loop adds its own fields)."""

    job: Job
    model: Any
    """As prepared by accelerate (DDP/FSDP-wrapped when distributed)."""
    optimizer: Any
    scheduler: Any
    params: list
    """The trainable parameters: what is clipped and watched for divergence."""
    sharded: bool
    """FSDP/DeepSpeed: weights and optimizer state are saved as accelerate's shards."""
    steps: int
    state: Progress
    resumed_from: int | None
    out: Outputs | None = None
    """train_log.jsonl, metric sinks, progress bar and stop flag, while steps run."""
    stopped: str | None = None
    """Why the loop ends early: "signal" or "early_stopping"."""
    tokens_now: int = 0
    """Tokens trained on in this process's part of the run (for tokens/s)."""
