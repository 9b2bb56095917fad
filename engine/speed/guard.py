"""A speed-up is optional, a run is not: every switch checks itself and steps aside.

Why: each switch in engine/speed replaces a piece of a library (transformers' rotary function
and norm classes, PEFT's LoRA layer, an attention implementation) with code that computes the
same thing faster. Libraries move: a release can turn a function into a callable object, change
its maths or rename an attribute. So a switch is never trusted on its name or its source text.
When it is entered it runs its own code and the stock code on a small input, forward and
backward, and compares the numbers. If they differ, or anything raises (a missing attribute, a
new signature), the switch is skipped: the run goes on with the stock code and one line says
which switch and why. ``Switches`` records what happened to each, for the train log,
metrics.json and the report.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import torch

T = TypeVar("T")

ON, OFF, SKIPPED = "on", "off", "skipped"


class CheckFailed(Exception):
    """A switch's self-check found its result differs from the stock code's."""


class NotApplicable(Exception):
    """The switch has nothing to do here (another dtype, device or layer type): recorded as off."""


def assert_close(what: str, got: torch.Tensor, want: torch.Tensor, *, rtol: float = 1e-4, atol: float = 1e-5) -> None:
    """Raise ``CheckFailed`` naming ``what`` and the largest difference when the two disagree."""
    if not isinstance(got, torch.Tensor) or not isinstance(want, torch.Tensor):
        raise CheckFailed(f"{what}: expected tensors, got {type(got).__name__} and {type(want).__name__}")
    if got.shape != want.shape:
        raise CheckFailed(f"{what}: shape {tuple(got.shape)} != stock {tuple(want.shape)}")
    if not torch.allclose(got.float(), want.float(), rtol=rtol, atol=atol):
        diff = (got.float() - want.float()).abs().max().item()
        raise CheckFailed(f"{what} differs from the stock code by up to {diff:.3g}")


@dataclass
class Switches:
    """What each speed switch did in this run: ``on``, ``off`` (not asked for, or not for this
    device/model) or ``skipped`` (asked for, but its self-check failed), with a detail."""

    status: dict[str, str] = field(default_factory=dict)
    quiet: bool = False
    """No notice lines (tests that break switches on purpose still get the record)."""

    def on(self, name: str, detail: str = "") -> None:
        self.status[name] = f"{ON} ({detail})" if detail else ON

    def off(self, name: str, why: str) -> None:
        self.status[name] = f"{OFF} ({why})"

    def skip(self, name: str, why: str) -> None:
        self.status[name] = f"{SKIPPED}: {why}"
        if not self.quiet:
            print(f"[engine] speed-up {name} skipped, running the stock code instead: {why}", flush=True)

    def active(self, name: str) -> bool:
        return self.status.get(name, "").startswith(ON)

    def summary(self) -> str:
        """One line for the console and the log: ``name on (...), name off (...)``."""
        return ", ".join(f"{k} {v}" for k, v in self.status.items())


def reason(error: BaseException) -> str:
    """A short reason: the check's own message, or the exception's type and first line."""
    if isinstance(error, CheckFailed):
        return str(error)
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {first[:200]}" if first else type(error).__name__


def attempt(switches: Switches, name: str, check: Callable[[], None], apply: Callable[[], T]) -> T | None:
    """Run ``check`` (on its own copy of the random stream, so a run's draws do not move), then
    ``apply``; on any exception from either, record ``name`` as skipped and return None.

    ``apply`` must leave nothing half-done when it raises, or be undone by the caller's exit
    stack, which the switches in engine/speed/apply.py register before applying. A check that
    raises ``NotApplicable`` records the switch as off, with its reason, and applies nothing.
    """
    try:
        with torch.random.fork_rng(devices=[]):
            check()
        return apply()
    except NotApplicable as why:
        switches.off(name, str(why))
    except Exception as error:  # a speed-up may never stop a run
        switches.skip(name, reason(error))
    return None


def passing(switches: Switches, name: str, candidates: dict, check: Callable[[object], None]) -> list:
    """The keys of ``candidates`` whose value passes ``check`` (each through ``attempt``: a
    failure is recorded under ``name`` and skips only that candidate)."""
    return [key for key, value in candidates.items() if attempt(switches, name, lambda v=value: check(v), lambda: True)]
