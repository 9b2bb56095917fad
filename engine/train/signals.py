"""SIGTERM / Ctrl-C: finish the step, write a checkpoint, exit with 128 + the signal number."""

from __future__ import annotations

import signal

import torch

from engine.errors import UserError
from engine.train import checkpoint as ckpt_io
from engine.train.job import Run


class Interrupted(UserError):
    """SIGTERM / Ctrl-C: a checkpoint was written; exit status 128 + signal number."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class StopOnSignal:
    """SIGTERM / Ctrl-C ask the loop to checkpoint and stop after the current step.

    A second Ctrl-C interrupts at once. Under several processes the flag is agreed on
    (summed over ranks) every step, so all ranks stop at the same step.
    """

    def __init__(self):
        self.signum = 0
        self._old = {}
        try:
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            self._old = {}

    def _handle(self, signum, frame):
        self.signum = signum
        signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)
        print(f"\n[engine] {signal.Signals(signum).name}: finishing this step, writing a checkpoint, exiting", flush=True)

    def requested(self, acc) -> bool:
        if acc.num_processes > 1:
            t = acc.reduce(torch.tensor([int(self.signum)], device=acc.device), "sum")
            if int(t[0]) and not self.signum:
                self.signum = signal.SIGTERM  # another rank got the signal
        return bool(self.signum)

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def raise_if_interrupted(run: Run) -> None:
    """After the steps: a signal stop ends the run here, naming the checkpoint it continues from."""
    if run.stopped != "signal":
        return
    job, step, signum = run.job, run.state.step, run.out.stop.signum
    where = ckpt_io.checkpoints_dir(job.run_dir) / f"step-{step}"
    raise Interrupted(
        f"interrupted by {signal.Signals(signum).name} after step {step}; checkpoint {where} written. "
        f"Re-run the same command with hydra.run.dir={job.run_dir} to continue.",
        signum,
    )
