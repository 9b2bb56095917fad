"""The command line around Hydra: early validation, shared run dirs, user-error reporting."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from engine.errors import ConfigError, UserError
from engine.registry import did_you_mean

INFO_FLAGS = {"--help", "-h", "--hydra-help", "--info", "-i", "--version", "--shell-completion", "-sc"}


def fail(err: UserError) -> None:
    sys.stderr.write(f"engine: {err}\n" if not isinstance(err, ConfigError) else f"engine: {err.format()}\n")
    sys.exit(err.exit_code)


def precheck(argv: list[str], conf_dir: str) -> list[str]:
    """Compose the command line once (first value of each sweep) and validate it.

    Returns the command line for Hydra: an override of a key that the schema has but the
    chosen preset's YAML leaves out (``adapter.bias=all``) becomes ``++adapter.bias=all``,
    so Hydra's struct mode does not reject what the schema accepts.
    """
    if any(a in INFO_FLAGS or a.startswith("--info") for a in argv):
        return argv
    printing = any(a in ("--cfg", "-c") or a.startswith("--cfg=") for a in argv)
    added: set[str] = set()
    try:
        compose_and_validate(argv, conf_dir, check=not printing, added=added)
    except UserError as e:
        fail(e)
    return [f"++{a}" if not a.startswith(("+", "~", "-")) and a.split("=", 1)[0] in added else a for a in argv]


def _overrides(argv: list[str]) -> list[str]:
    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    args = get_args_parser().parse_args(argv)
    try:
        parsed = OverridesParser.create().parse_overrides(args.overrides)
    except OverrideParseException as e:
        raise ConfigError(f"cannot parse the command line: {str(e).splitlines()[0]}") from None
    out = []
    for o in parsed:
        if o.key_or_group.startswith("hydra"):
            continue
        if o.is_sweep_override():
            out.append(f"{o.get_key_element()}={next(iter(o.sweep_string_iterator()))}")
        else:
            out.append(o.input_line)
    return out


def compose_and_validate(argv: list[str], conf_dir: str, check: bool = True, added: set[str] | None = None):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import ConfigCompositionException, MissingConfigException
    from omegaconf import OmegaConf, open_dict

    from engine.config import validate

    overrides = _overrides(argv)
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=conf_dir, version_base="1.3"):
        for _attempt in range(len(overrides) + 1):
            try:
                cfg = compose("config", overrides=overrides, return_hydra_config=True)
                break
            except MissingConfigException as e:
                raise ConfigError(_missing_option(e)) from None
            except ConfigCompositionException as e:
                # An override of a key the presets do not have: let validation name it,
                # with the keys that do exist, by adding it as a new key.
                m = re.search(r"Could not override '([^']+)'", str(e))
                if not m:
                    raise ConfigError(str(e).splitlines()[0]) from None
                key = m.group(1)
                if added is not None:
                    added.add(key)
                overrides = [f"++{o}" if o.split("=", 1)[0] == key else o for o in overrides]
        choices = OmegaConf.to_container(cfg.hydra.runtime.choices)
        with open_dict(cfg):
            del cfg["hydra"]
        raw = OmegaConf.to_container(cfg, resolve=True)
    GlobalHydra.instance().clear()
    raw["recipe"] = choices.get("recipe")
    return validate(raw) if check else raw


def _missing_option(e: Exception) -> str:
    text = str(e)
    m = re.search(r"Could not find '([^/']+)/([^']+)'", text)
    opts = re.findall(r"^\t(\S+)$", text.split("Config search path")[0], flags=re.M)
    if m:
        group, name = m.groups()
        return f"{group}: no preset '{name}'{did_you_mean(name, opts)}; valid: {', '.join(opts)}"
    return text.split("Config search path")[0].strip()


def share_run_dir(argv: list[str]) -> list[str]:
    """Under ``accelerate launch``, give every rank rank 0's run dir (no per-rank ``${now:}``).

    Only rank 0 writes there: other ranks skip Hydra's .hydra/ record and its log file.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return argv
    import torch
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    # The first PartialState fixes the backend: gloo on CPU (no CUDA, or device=cpu), else nccl.
    state = PartialState(cpu="device=cpu" in argv or not torch.cuda.is_available())
    extra = []
    if not any(a.startswith("hydra.run.dir=") for a in argv):
        stamp = [None]
        if state.is_main_process:
            import time

            stamp = [time.strftime("%Y-%m-%d_%H-%M-%S")]
        broadcast_object_list(stamp, from_process=0)
        recipe = next((a.split("=", 1)[1] for a in argv if a.startswith("recipe=")), "lora_smollm2")
        extra.append(f"hydra.run.dir=outputs/{recipe}/{stamp[0]}")
    if not state.is_main_process:
        extra += ["hydra.output_subdir=null", "hydra/job_logging=stdout"]
    return [*argv, *extra]


def run_task(cfg) -> None:
    """Hydra's task function: validate, then run the pipeline in Hydra's run dir."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from engine.config import validate
    from engine.pipeline import run

    hc = HydraConfig.get()
    raw = OmegaConf.to_container(cfg, resolve=True)
    raw["recipe"] = hc.runtime.choices.get("recipe")
    try:
        validated = validate(raw)
        run(validated, Path(hc.runtime.output_dir))
    except UserError as e:
        fail(e)
