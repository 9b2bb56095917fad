"""User-facing errors: what went wrong, where, and what would work — never a traceback.

``ConfigError`` (exit status 2) is raised for anything the user can fix in the config or on
the command line; ``UserError`` (exit status 1) for bad inputs found at run time (a missing
model, a data file with no usable row). ``engine.__main__`` prints them without a traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's inputs, reported as a short message."""

    exit_code = 1


class ConfigError(UserError):
    """One or more invalid config values, reported together (exit status 2)."""

    exit_code = 2

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__(self.format())

    def format(self) -> str:
        n = len(self.problems)
        head = f"invalid config ({n} problem{'s' if n > 1 else ''}):"
        return "\n".join([head, *(f"  - {p}" for p in self.problems)])
