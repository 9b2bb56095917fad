"""Schema of the ``sweep`` group: what a sweep optimises and plots (no heavy imports)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import field_validator

from engine.registry import Strict

KEY = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_@/-]+)+$")


class SweepSpec(Strict):
    objective: str | None = None
    """A metrics.json key, dotted (``train.final_loss``, ``evaluate.test.token_f1``): each job of a
    multirun returns its value to Hydra's sweeper (Optuna needs it) and the summary names the best job."""
    direction: Literal["minimize", "maximize"] = "minimize"
    """Whether a smaller or a larger objective is better (the Optuna presets read it from here)."""
    metric: str | None = None
    """The metrics.json key the summary plots against each swept key (null: the objective, else train.final_loss)."""

    @field_validator("objective", "metric")
    @classmethod
    def _dotted(cls, v):
        if v is not None and not KEY.match(v):
            raise ValueError(
                f"'{v}' is not a metrics.json key: write <stage>.<key>[.<key>...], e.g. train.final_loss "
                "or evaluate.test.token_f1 (see a run's metrics.json)"
            )
        return v


# The Hydra plugin behind each sweeper/launcher preset family: (module, pip package, engine extra).
PLUGINS = {
    "optuna": ("hydra_plugins.hydra_optuna_sweeper", "hydra-optuna-sweeper", "sweep"),
    "joblib": ("hydra_plugins.hydra_joblib_launcher", "hydra-joblib-launcher", "sweep"),
    "submitit": ("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher", "cluster"),
    "ray": ("hydra_plugins.hydra_ray_launcher", "hydra-ray-launcher", "cluster"),
}


def check_plugins(argv: list[str], conf_dir: str, sweep: dict) -> list[str]:
    """Problems with ``hydra/sweeper=`` / ``hydra/launcher=`` choices, before Hydra fails on them.

    Hydra reports a sweeper or launcher whose plugin is not installed as a missing config with a
    stack trace; say which package to install instead. An Optuna sweep without ``sweep.objective``
    would fail after its first trial ("Return value must be float-castable"): refuse it up front.
    """
    import importlib.util

    problems = []
    for arg in argv:
        key, eq, name = arg.lstrip("+").partition("=")
        if not eq or key not in ("hydra/sweeper", "hydra/launcher"):
            continue
        preset = Path(conf_dir) / key / f"{name}.yaml"
        text = preset.read_text() if preset.is_file() else ""
        family = next((f for f in PLUGINS if name.startswith(f) or f"- {f}" in text or f"- /{key}/{f}" in text), None)
        if family is None:
            continue
        module, package, extra = PLUGINS[family]
        if importlib.util.find_spec(module.split(".")[0]) is None or importlib.util.find_spec(module) is None:
            problems.append(
                f"{key}: {name} needs the {package} package: pip install 'engine[{extra}]' (or pip install {package})"
            )
        if family == "optuna" and not sweep.get("objective"):
            problems.append(
                f"sweep.objective: not set, and {key}={name} optimises it; name a metrics.json key, e.g. "
                "sweep.objective=train.final_loss (sweep.direction=minimize) or sweep.objective=evaluate.test.token_f1 "
                "sweep.direction=maximize"
            )
    return problems
