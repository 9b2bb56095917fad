"""What every training loop here runs inside (SFT: loop.py, GRPO: engine/rl/grpo.py).

``speed_switches`` enters the CPU speed switches once, around set-up, steps and finish
(engine/speed/apply.py); ``outputs`` opens what the steps write to (train_log.jsonl and the
metric sinks on rank 0, the progress bar, the stop-on-signal flag) and closes it whatever happens.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, Any

from tqdm.auto import tqdm

from engine.files import portable_config
from engine.runs import TRAIN_LOG
from engine.speed.apply import speedups
from engine.train import checkpoint as ckpt_io
from engine.train.job import Job, Run
from engine.train.loggers import Loggers
from engine.train.signals import StopOnSignal


@contextmanager
def speed_switches(job: Job, *, packing: bool) -> Iterator[Any]:
    """The ``train`` group's speed switches on ``job.model``; rank 0 prints which are on."""
    tcfg = job.train
    with speedups(
        job.model,
        device_type=job.accelerator.device.type,
        packing=packing,
        keep_freed_memory=tcfg.keep_freed_memory,
        fused_ops=tcfg.fused_ops,
        compile=tcfg.compile,
        mixed_precision=job.accelerator.mixed_precision,
    ) as speed:
        if job.is_main:
            print(f"[engine] speed-ups: {speed.switches.summary()}", flush=True)
        yield speed


@dataclass
class Outputs:
    """Where running steps write: the log and sinks (rank 0 only), the progress bar, the stop flag."""

    log: IO | None
    sinks: Loggers | None
    progress: Any
    stop: StopOnSignal
    log_every: int
    t_start: float
    """When the first step started (perf_counter): train_seconds and tokens/s count from here."""

    def record(self, rec: dict) -> None:
        """One train_log.jsonl line, flushed at once (a crash loses no logged step), and the sinks."""
        if self.log:
            self.log.write(json.dumps(rec) + "\n")
            self.log.flush()
            self.sinks.log(rec)

    def advance(self, step: int, *, last: bool, **postfix: str) -> None:
        """One step on the progress bar; its numbers every ``train.log_every`` steps and at the end."""
        self.progress.update(1)
        if step % self.log_every == 0 or last:
            self.progress.set_postfix(**postfix)


@contextmanager
def outputs(run: Run, desc: str) -> Iterator[Outputs]:
    """Open the outputs for the steps after ``run.state.step`` (the log is cut back to it on resume)."""
    job = run.job
    log = sinks = None
    if job.is_main:
        ckpt_io.truncate_log(job.run_dir / TRAIN_LOG, run.state.step)
        log = open(job.run_dir / TRAIN_LOG, "a")
        # The config as config.yaml holds it (sample files as ${sample:NAME}): logger records are shared too.
        sinks = Loggers(job.train.loggers, job.run_dir, start_step=run.state.step, config=portable_config(job.config))
    stop = StopOnSignal()
    progress = tqdm(total=run.steps, initial=run.state.step, desc=desc, disable=not job.is_main, dynamic_ncols=True)
    try:
        yield Outputs(log, sinks, progress, stop, job.train.log_every, time.perf_counter())
    finally:
        stop.restore()
        progress.close()
        if log:
            log.close()
            sinks.close()
