"""``python -m engine [overrides]``: compose -> validate -> freeze -> launch.

Hydra composes the config (and handles ``-m`` sweeps, ``--cfg``, run dirs and launchers).
Before Hydra starts, the command line is composed once and validated, so a typo, a wrong
type or a bad value exits with status 2 and a short message instead of a traceback.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

CONF_DIR = str(Path(__file__).resolve().parent / "conf")


def main() -> None:
    from engine.config import register_resolvers

    register_resolvers()
    argv = sys.argv[1:]
    from engine.cli import precheck, share_run_dir

    argv = precheck(argv, CONF_DIR)
    sys.argv = [sys.argv[0], *share_run_dir(argv)]
    _hydra_main()


def _hydra_main() -> None:
    import hydra

    @hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
    def task(cfg) -> None:
        from engine.cli import run_task

        run_task(cfg)

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
    relaunch_with_huge_pages()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
