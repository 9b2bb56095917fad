"""Training: the loop (set-up / step / finish), checkpoints that survive crashes, loggers.

spec.py        the ``train`` config group's schema (defaults live in conf/train/default.yaml)
job.py         what a run is handed (TrainJob: typed specs, no run config) and carries (progress)
loop.py        the supervised training loop, top to bottom (the ``train`` stage)
layered.py     adapter levels trained in sequence with that loop (the ``train_layered`` stage)
step.py        forward/backward over a step's micro-batches, split further after a CUDA OOM
guard.py       stop a run whose loss, gradients or weights blew up, before it saves
validation.py  validation loss, best-checkpoint tracking, early stopping
optim.py       optimizer and learning-rate schedule           } shared with the GRPO loop
scaffold.py    speed switches and outputs around the steps    } (engine/rl/grpo.py)
signals.py     SIGTERM / Ctrl-C: checkpoint, then exit        }
saving.py      a live run's checkpoints and final adapter     }
checkpoint.py  atomic, checksummed checkpoint files and the config identity a resume compares
               (the resume decision itself: engine/config/record.py, before config.yaml is written)
loggers.py     TensorBoard / MLflow / W&B sinks and the loss plot

Importing this package (and job.py, spec.py) loads no torch: the stages import it when a run
is validated. ``train`` and ``train_layered`` load the loop when they are called.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine.adapter import LayeredSpec
    from engine.train.job import TrainJob
    from engine.train.layered import Layered


def train(job: TrainJob) -> dict:
    """One supervised training run (loop.py); returns its metrics."""
    from engine.train.loop import train as run

    return run(job)


def train_layered(job: TrainJob, spec: LayeredSpec) -> Layered:
    """Adapter levels trained one after another on ``job.model`` (layered.py)."""
    from engine.train.layered import train_layered as run

    return run(job, spec)
