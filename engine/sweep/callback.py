"""The Hydra callback that keeps a multirun dir's summary current (wired in conf/config.yaml).

``on_job_end`` rebuilds it after every job (in the job's process: a worker of the joblib
launcher, a SLURM node), so a sweep that dies half-way still leaves a table of what finished;
``on_multirun_end`` rebuilds it once more on the machine that launched the sweep, prints where
it is and the best job, and leaves the outcome in ``LAST`` for the entry point's exit status.
A summary that cannot be written is reported, never allowed to fail a job or the sweep.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

LAST: dict[str, Any] = {}
"""The sweep this process launched: ``dir``, and after it ended ``jobs``, ``failed``, ``best``."""


class SweepSummary(Callback):
    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled

    def on_multirun_start(self, config, **kwargs: Any) -> None:
        LAST.clear()
        LAST["dir"] = Path(str(config.hydra.sweep.dir))

    def on_job_end(self, config, job_return, **kwargs: Any) -> None:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
        if self.enabled and hc.mode == RunMode.MULTIRUN and _main_rank():
            self._rebuild(Path(str(hc.sweep.dir)), quiet=True)

    def on_multirun_end(self, config, **kwargs: Any) -> None:
        if not (self.enabled and _main_rank()):
            return
        summary = self._rebuild(Path(str(config.hydra.sweep.dir)), quiet=False)
        if summary is not None:
            LAST.update(jobs=len(summary.rows), failed=[r.job for r in summary.failed], best=summary.best)

    @staticmethod
    def _rebuild(sweep_dir: Path, quiet: bool):
        from engine.sweep.summary import headline, rebuild

        try:
            summary = rebuild(sweep_dir)
        except Exception as e:  # a summary bug must not cost the user the sweep's results
            print(f"[engine] could not write the sweep summary in {sweep_dir}: {type(e).__name__}: {e}", file=sys.stderr)
            return None
        if not quiet:
            lines = [f"[engine] sweep summary: {sweep_dir / 'sweep_summary.md'} (and .csv, .html, .png)"]
            lines += [f"[engine]   {line.replace('**', '').replace('`', '')}" for line in headline(summary)]
            print("\n".join(lines), flush=True)
        return summary


def _main_rank() -> bool:
    """Under ``accelerate launch`` every rank runs the sweep's jobs together; rank 0 writes."""
    return os.environ.get("RANK", "0") == "0"
