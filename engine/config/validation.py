"""Validate a composed config against every preset's typed schema, before anything loads.

Hydra composes YAML (engine/config/compose.py); this module turns the resolved dict into a
frozen ``RunConfig`` of typed specs. All problems are collected and raised together as one
``ConfigError``: each names its full key, what is wrong, and the valid choices where the set
is closed. ``validate`` runs once per run, in the process that composed it; whatever executes
the run reads the frozen ``config.yaml`` back with ``parse`` (schemas only: the cross-group
rules and file checks were already passed when it was written).
"""

from __future__ import annotations

import importlib
from typing import Any, Literal

from pydantic import BaseModel, ValidationError

from engine.context import RunConfig
from engine.errors import ConfigError
from engine.evaluate.spec import EvalSpec
from engine.registry import Registry, Strict, did_you_mean
from engine.rl.spec import GrpoSpec
from engine.sweep.spec import SweepSpec
from engine.train.spec import TrainSpec

# Common names users type for our keys: suggested in "did you mean".
SYNONYMS = {
    "rank": "r",
    "lora_r": "r",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "learning_rate": "lr",
    "batch_size": "micro_batch_size",
    "steps": "max_steps",
    "gradient_accumulation_steps": "grad_accum",
    "num_epochs": "epochs",
}


class TopSpec(Strict):
    recipe: str
    stages: list[str]
    """The pipeline, in order (engine/stages/): at least one."""
    plugins: list[str] = []
    seed: int = 0
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"


def registries() -> dict[str, Registry]:
    """Config group -> registry (imported here so plugins see the same tables)."""
    from engine.adapter import ADAPTERS
    from engine.data.shapes import SHAPES
    from engine.export import EXPORTS
    from engine.loss import LOSSES
    from engine.model import MODELS
    from engine.quantization import QUANTIZATIONS
    from engine.retrieval import RETRIEVAL
    from engine.retrieval import index as _index  # noqa: F401  (registers the index kinds)
    from engine.reward import REWARDS
    from engine.serve import SERVERS
    from engine.serve import backends as _  # noqa: F401  (registers the serve kinds)

    return {
        "model": MODELS,
        "quantization": QUANTIZATIONS,
        "adapter": ADAPTERS,
        "loss": LOSSES,
        "data": SHAPES,
        "export": EXPORTS,
        "serve": SERVERS,
        "retrieval": RETRIEVAL,
        "reward": REWARDS,
    }


FIXED = {"train": TrainSpec, "eval": EvalSpec, "sweep": SweepSpec, "grpo": GrpoSpec}


COUNTS = {"validate": 0}
"""How many times this process validated a run (tests assert once per run)."""


def validate(raw: dict[str, Any]) -> RunConfig:
    """The composed dict -> ``RunConfig``, or one ``ConfigError`` with every problem: each group's
    schema, the stage names, the device, and the rules across groups (engine/checks.py)."""
    COUNTS["validate"] += 1
    return _validated(raw, checks=True)


def parse(raw: dict[str, Any]) -> RunConfig:
    """A frozen record (``config.yaml``) back into its ``RunConfig``: the schemas only.

    Why not ``validate``: the record was validated when it was written; reading it on every
    rank, in every sweep job and in ``eval.run_dir`` must not run the checks again (they look
    at devices, packages and files, and would cost every rank a torch import before it needs one).
    """
    return _validated(raw, checks=False)


def _validated(raw: dict[str, Any], *, checks: bool) -> RunConfig:
    problems: list[str] = []
    groups = registries()
    top_fields = set(TopSpec.model_fields)
    known = top_fields | set(groups) | set(FIXED)
    for key in raw:
        if key not in known:
            problems.append(f"{key}: unknown key{_suggest(key, sorted(known))}; valid top-level keys: {', '.join(sorted(known))}")

    top = _check(TopSpec, {k: raw.get(k) for k in top_fields if k in raw}, "", problems)
    import_plugins(raw.get("plugins") or [], problems)
    _check_stage_names(top, problems)
    specs = check_groups(raw, list(groups), problems)
    for group, schema in FIXED.items():
        specs[group] = _check(schema, raw.get(group) or {}, group, problems)

    if checks:
        from engine.checks import cross_checks

        if top is not None:
            _check_device(top, problems)
        cross_checks(specs, top, problems)
    if problems:
        raise ConfigError(problems)
    cfg = RunConfig(**top.model_dump(), **specs, raw=raw)
    if not cfg.eval.run_dir:
        return cfg
    from engine.checks import evaluated_run

    return evaluated_run(cfg, validate if checks else parse)


def import_plugins(modules: list[str], problems: list[str]) -> None:
    """``plugins:`` imported before any registry is read, so their kinds and stages count."""
    for i, mod in enumerate(modules):
        try:
            importlib.import_module(mod)
        except Exception as e:  # a plugin that fails to import is a config problem
            problems.append(f"plugins[{i}]: cannot import '{mod}': {type(e).__name__}: {e}")


def check_groups(raw: dict[str, Any], names: list[str], problems: list[str]) -> dict[str, Any]:
    """{group: spec} for the named registry groups (None where a group has a problem, appended)."""
    groups = registries()
    return {group: _check_group(group, groups[group], raw.get(group), problems) for group in names}


def _check_stage_names(top: TopSpec | None, problems: list[str]) -> None:
    from engine.stages import STAGES

    for i, stage in enumerate((top.stages if top else None) or []):
        if stage not in STAGES:
            problems.append(f"stages[{i}]: {STAGES.unknown_message(stage)}")
    if top is not None and not top.stages:
        problems.append(
            "stages: empty, so the run would do nothing; list the stages to run, e.g. "
            f"stages=[prepare_data,train,evaluate,report] (valid: {', '.join(STAGES.keys())})"
        )


def _check_group(group: str, registry: Registry, node: Any, problems: list[str]):
    if not isinstance(node, dict):
        problems.append(f"{group}: expected a preset mapping with a 'kind'; choose a preset, e.g. {group}=<name>")
        return None
    kind = node.get("kind")
    if kind not in registry:
        problems.append(f"{group}.kind: {registry.unknown_message(kind)}")
        return None
    return _check(registry.get(kind).spec, node, group, problems)


def _check(schema: type[BaseModel], node: Any, prefix: str, problems: list[str]):
    try:
        return schema.model_validate(node)
    except ValidationError as err:
        for e in err.errors():
            key = ".".join([prefix, *map(str, e["loc"])]).strip(".")
            problems.append(_describe(schema, key, e))
        return None


def _describe(schema: type[BaseModel], key: str, e: dict) -> str:
    if e["type"] == "extra_forbidden":
        leaf = key.rsplit(".", 1)[-1]
        valid = [f for f in schema.model_fields if f != "kind"]
        valid_text = ", ".join(valid) or "none (this kind takes no settings)"
        return f"{key}: unknown key{_suggest(leaf, valid)}; valid keys here: {valid_text}"
    msg = e["msg"].replace("Input should be", "should be").replace("Value error, ", "")
    if e["type"] == "missing":
        return f"{key}: required, but not set"
    got = e.get("input")
    if isinstance(got, dict | list) and len(repr(got)) > 60:  # a whole group or a long list: the message names what is wrong
        return f"{key}: {msg}"
    return f"{key}: {msg}" if repr(got) in msg or str(got) in msg else f"{key}: {msg} (got {got!r})"


def _suggest(word: str, choices: list[str]) -> str:
    if word in SYNONYMS and SYNONYMS[word] in choices:
        return f" (did you mean '{SYNONYMS[word]}'?)"
    return did_you_mean(word, choices)


def _check_device(top: TopSpec, problems: list[str]) -> None:
    if top.device == "auto":
        return
    import torch

    present = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not present[top.device]:
        have = [d for d, ok in present.items() if ok]
        problems.append(f"device: '{top.device}' is not present on this machine; available: {', '.join(have)} (or auto)")
