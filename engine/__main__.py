"""``python -m engine [overrides]`` and the ``engine`` console script: one ``main`` for both.

compose -> validate -> freeze -> launch: Hydra composes the config (and handles ``-m``
sweeps, ``--cfg``, run dirs and launchers). Before Hydra starts, ``engine.cli.prepare``
composes the command line once with the same search path and checks it, so a typo, a wrong
type or a bad value exits with status 2 and a short message instead of a traceback.
"""

from __future__ import annotations

import os
import sys


def main() -> None:
    """The whole program. Both entry points call exactly this, so they behave the same: the
    huge-page restart and the tokenizer-threads default happen here, not in ``__main__`` only."""
    relaunch_with_huge_pages()
    # Tokenizers' own thread pool fights the training threads and warns after a fork.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if sys.argv[1:2] == ["sweep"]:  # `engine sweep DIR`: the same as `python -m engine.sweep DIR`
        from engine.sweep.__main__ import main as sweep_main

        sys.exit(sweep_main(sys.argv[2:]))
    from engine.cli import prepare

    sys.argv = [sys.argv[0], *prepare(sys.argv[1:])]
    try:
        _hydra_main()
    finally:
        from engine.sweep.__main__ import after_multirun

        code = after_multirun()
    sys.exit(code)


def _hydra_main() -> None:
    import hydra

    from engine.cli import CONF_DIR

    @hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
    def task(cfg) -> float | None:
        from engine.cli import run_task

        return run_task(cfg)  # a sweep job's objective, for Hydra's sweeper

    task()


def relaunch_with_huge_pages() -> None:
    """Re-execute this very command once with glibc's huge-page heap (see
    engine.speed.memory.huge_pages_env for why and when); a no-op where it would change nothing."""
    from engine.speed.memory import huge_pages_env

    env = huge_pages_env(os.environ)
    if env is None or not sys.executable:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, sys.orig_argv, env)
    except OSError:
        pass  # could not restart (unusual interpreter setup): run on with the default heap


if __name__ == "__main__":
    main()
