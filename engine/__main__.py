"""``python -m engine [overrides]`` and the ``engine`` console script: one ``main`` for both.

compose -> validate -> freeze -> launch lives in engine/cli.py; this file only does what must
happen before anything is imported: the huge-page restart, the tokenizer-threads default and
the ``engine sweep DIR`` sub-command.
"""

from __future__ import annotations

import os
import sys


def main() -> None:
    """The whole program. Both entry points call exactly this, so they behave the same."""
    argv = sys.argv[1:]
    if not _answers_only(argv):
        relaunch_with_huge_pages()
    # Tokenizers' own thread pool fights the training threads and warns after a fork.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if argv[:1] == ["sweep"]:  # `engine sweep DIR`: the same as `python -m engine.sweep DIR`
        from engine.sweep.__main__ import main as sweep_main

        sys.exit(sweep_main(argv[1:]))
    from engine.cli import main as cli_main

    sys.exit(cli_main(argv))


def _answers_only(argv: list[str]) -> bool:
    """``--help`` / ``--cfg``: nothing runs, so the heap setting would change nothing but the wait."""
    return any(a in ("--help", "-h", "--cfg", "-c") or a.startswith("--cfg=") for a in argv)


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
