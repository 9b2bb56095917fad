"""Sweeps: one table for a Hydra multirun, its jobs' bookkeeping, and the Optuna objective.

``python -m engine -m adapter.r=4,8 train.lr=1e-4,2e-4`` runs one job per combination, each in
its own dir under ``hydra.sweep.dir``. This package adds what Hydra leaves to the user:

- ``job``: each job's record (``sweep_job.json``: status, error, wall time, peak memory), a
  failing job recorded instead of stopping the sweep, a finished job skipped when the sweep is
  re-run in the same dir, and the objective value returned to Hydra's sweeper (Optuna);
- ``summary``: ``sweep_summary.csv/.md/.html/.json`` and ``sweep_summary.png`` from the job dirs
  (also for a sweep that is still running or was killed), or for any run dirs (``--compare``);
- ``callback``: the Hydra callback that rebuilds the summary after each job and at the end.

Nothing here imports torch or the pipeline: the entry point hands a job its work as a callable.
"""
