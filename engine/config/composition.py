"""Hydra composition of a command line, done once per run: the resolved config and Hydra's own node.

Why here and not in the CLI: the CLI, ``engine.env``, the bench scripts and the tests all compose
through this one function (with the same search path, ``--config-dir`` folders, the
``${sample:NAME}`` resolver, the ``++`` retry for schema keys a preset leaves out, and the same
error messages). No torch is imported: a typo answers in well under a second.
"""

from __future__ import annotations

import os
import re
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.config_search_path import ConfigSearchPath, SearchPathQuery
from hydra.plugins.search_path_plugin import SearchPathPlugin
from omegaconf import OmegaConf

from engine.errors import ConfigError
from engine.files import ENGINE_DIR, SAMPLES_DIR
from engine.registry import did_you_mean

CONF_DIR = str(ENGINE_DIR / "conf")
CONFIG_DIR_FLAGS = ("--config-dir", "-cd")
# Hydra settings a composition keeps from the command line: where configs are found, where the run goes, env copied.
KEPT_HYDRA_KEYS = ("hydra.searchpath", "hydra.run.dir", "hydra.sweep.dir", "hydra.job.env_set")
JOB_NAME = "__main__"
"""Hydra's ``hydra.job.name``: names the run's log file (``__main__.log``), as ``python -m engine`` always has."""

COUNTS = {"compose": 0}
"""How many times this process composed (tests assert one composition per run)."""


_HYDRA = threading.RLock()
"""Held while Hydra composes: its global state (``GlobalHydra``, ``HydraConfig``) is one per process."""


@dataclass
class Composed:
    """One composition: the task config (resolved, ``recipe`` = the recipe's name) and Hydra's node."""

    raw: dict[str, Any]
    hydra: dict[str, Any]
    """choices, config sources, run/sweep dir, multirun, the unresolved hydra tree."""
    cfg: Any
    """The composed DictConfig with its ``hydra`` node, for the job's log set-up and .hydra/ record."""


def register_resolvers() -> None:
    """``${sample:NAME}``: path of a sample data file shipped inside the engine package."""
    if not OmegaConf.has_resolver("sample"):
        OmegaConf.register_new_resolver("sample", lambda name: str(SAMPLES_DIR / name))


class UserConfigs(SearchPathPlugin):
    """Puts ``--config-dir`` folders *before* the shipped configs on Hydra's search path.

    Hydra itself appends ``--config-dir`` after the primary config dir, so a user preset that
    has a shipped preset's name would be silently ignored. Here the user's folder wins, and
    ``report_shadows`` says so on screen. Registered once per process; ``dirs`` is set from
    the command line before every compose.
    """

    dirs: list[str] = []

    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        for d in self.dirs:
            search_path.prepend("engine --config-dir", f"file://{d}", anchor=SearchPathQuery(provider="main"))


def use_config_dirs(argv: list[str]) -> list[str]:
    """Take ``--config-dir DIR`` (``-cd DIR``, repeatable) off the command line into ``UserConfigs``."""
    from hydra.core.plugins import Plugins

    rest, dirs = [], []
    it = iter(argv)
    for a in it:
        flag, eq, value = a.partition("=")
        if flag in CONFIG_DIR_FLAGS:
            value = value if eq else next(it, "")
            path = Path(value).expanduser().absolute()
            if not path.is_dir():
                raise ConfigError(f"{flag}: '{value}' is not a directory; give a folder holding <group>/<preset>.yaml files")
            dirs.append(str(path))
        else:
            rest.append(a)
    UserConfigs.dirs = dirs
    Plugins.instance().register(UserConfigs)
    return rest


def compose(argv: list[str], conf_dir: str = CONF_DIR, added: set[str] | None = None) -> Composed:
    """Compose a command line (``--config-dir`` already taken off; a sweep's first values).

    ``added`` collects the keys that had to become ``++key`` (the schema has them, the chosen
    preset's YAML leaves them out), so the CLI can hand Hydra's own multirun the same line.
    """
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict
    from omegaconf.errors import InterpolationResolutionError
    from yaml import YAMLError

    register_resolvers()
    COUNTS["compose"] += 1
    overrides = _overrides(argv)
    with _HYDRA:  # Hydra's state is one per process: two threads composing at once would collide
        GlobalHydra.instance().clear()
        try:
            with initialize_config_dir(config_dir=conf_dir, version_base="1.3", job_name=JOB_NAME):
                cfg = _compose_retrying(overrides, added)
                HydraConfig.instance().set_config(cfg)
                hydra = {
                    "choices": OmegaConf.to_container(cfg.hydra.runtime.choices),
                    "sources": OmegaConf.to_container(cfg.hydra.runtime.config_sources),
                    "run_dir": str(cfg.hydra.run.dir),
                    "sweep_dir": str(cfg.hydra.sweep.dir),
                    "multirun": parse_args(argv).multirun,
                    "tree": OmegaConf.to_container(cfg.hydra, resolve=False),
                }
                task = cfg.copy()
                with open_dict(task):
                    del task["hydra"]
                raw = OmegaConf.to_container(task, resolve=True)
        except YAMLError as e:
            raise ConfigError(_yaml_problem(e)) from None
        except InterpolationResolutionError as e:  # ${oc.env:UNSET}, ${no.such.key}
            why = str(e).splitlines()[0].split("resolving interpolation: ")[-1]
            raise ConfigError(f"{e.full_key}: cannot resolve its interpolation: {why}") from None
        finally:
            GlobalHydra.instance().clear()
    raw["recipe"] = hydra["choices"].get("recipe")
    return Composed(raw=raw, hydra=hydra, cfg=cfg)


def _overrides(argv: list[str]) -> list[str]:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    args = parse_args(argv)
    try:
        parsed = OverridesParser.create().parse_overrides(args.overrides)
    except OverrideParseException as e:
        raise ConfigError(f"cannot parse the command line: {str(e).splitlines()[0]}") from None
    out = []
    for o in parsed:
        if o.key_or_group.startswith("hydra") and not o.key_or_group.startswith(KEPT_HYDRA_KEYS):
            continue
        out.append(f"{o.get_key_element()}={_first_value(o)}" if o.is_sweep_override() else o.input_line)
    return out


def _first_value(o) -> str:
    """A value the sweep can give a key: the first of a choice or range, an interval's lower end
    (Optuna's search spaces: ``interval(1e-5, 1e-3)``, ``tag(log, interval(...))``)."""
    from hydra.core.override_parser.types import ValueType

    if o.value_type == ValueType.INTERVAL_SWEEP:
        start = o.value().start
        return str(int(start) if float(start).is_integer() and "int(" in o.input_line else start)
    return next(iter(o.sweep_string_iterator()))


def _compose_retrying(overrides: list[str], added: set[str] | None):
    from hydra import compose as hydra_compose
    from hydra.errors import ConfigCompositionException, MissingConfigException

    for _attempt in range(len(overrides) + 1):
        try:
            return hydra_compose("config", overrides=overrides, return_hydra_config=True)
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
    raise ConfigError("cannot compose the command line")


def parse_args(argv: list[str]):
    """Hydra's own reading of a command line (overrides, ``-m``, ``--cfg`` ...)."""
    from hydra._internal.utils import get_args_parser

    return get_args_parser().parse_args(argv)


def _yaml_problem(e: Exception) -> str:
    """``file:line:column: what is wrong`` for a YAML syntax error in a config file."""
    mark, context = getattr(e, "problem_mark", None), getattr(e, "context", None)
    where = f"{mark.name}:{mark.line + 1}:{mark.column + 1}" if mark is not None else "a config file"
    what = getattr(e, "problem", None) or str(e).splitlines()[0]
    start = getattr(e, "context_mark", None)
    if context and start is not None:
        what += f" ({context} that starts at line {start.line + 1})"
    return f"{where}: YAML syntax error: {what}"


def _missing_option(e: Exception) -> str:
    text = str(e)
    m = re.search(r"Could not find '([^/']+)/([^']+)'", text)
    opts = re.findall(r"^\t(\S+)$", text.split("Config search path")[0], flags=re.M)
    if m:
        group, name = m.groups()
        return f"{group}: no preset '{name}'{did_you_mean(name, opts)}; valid: {', '.join(opts)}"
    return text.split("Config search path")[0].strip()


def report_shadows(hydra: dict, conf_dir: str = CONF_DIR) -> None:
    """Say which chosen presets come from a user folder instead of the shipped configs.

    A user preset with a shipped preset's name is allowed (that is how one adapts a shipped
    recipe without copying the package), but never silently: one line per shadowed preset.
    """
    shipped = Path(conf_dir).resolve()
    folders = [Path(s["path"]).resolve() for s in hydra["sources"] if s["schema"] == "file"]
    chosen = [("", "config")] + [(g, n) for g, n in hydra["choices"].items() if n and not g.startswith("hydra")]
    for group, name in chosen:
        rel = Path(group) / f"{name}.yaml"
        having = [f for f in folders if (f / rel).is_file()]
        if shipped not in having or len(having) < 2:
            continue
        label = f"{group}/{name}" if group else "config.yaml (the primary config)"
        if having[0] != shipped:
            msg = f"[engine] {label} from {having[0]} shadows the shipped one"
        else:
            user = having[1]
            msg = f"[engine] {label} in {user} is not used: the shipped one comes first (to use yours: --config-dir {user})"
        if os.environ.get("RANK", "0") == "0":
            print(msg, file=sys.stderr, flush=True)


def refuse_secrets(argv: list[str], raw: dict | None = None, hydra: dict | None = None) -> None:
    """A config value that holds a token (``${oc.env:HF_TOKEN}``, or the token typed in) would be
    written to config.yaml, Hydra's .hydra/, file names and the loggers: refuse it, without
    printing it. The command line is checked as typed (before anything resolves); the composed
    config resolved; Hydra's own settings unresolved (Hydra resolves them later)."""
    from engine.settings import keys_holding_secrets

    found = [(o.split("=", 1)[0].lstrip("+~"), var) for o in argv for _, var in keys_holding_secrets([o])]
    if raw is not None:
        found += keys_holding_secrets(raw)
    if hydra is not None:
        tree = {k: v for k, v in hydra["tree"].items() if k != "overrides"}  # overrides: checked as typed
        found += keys_holding_secrets(tree, "hydra")
    if found:
        raise ConfigError(
            [
                f"{key}: contains the secret {var} (its value or ${{oc.env:{var}}}); secrets never go into the config, "
                f"which is written to the run dir. engine reads {var} from the environment or a .env file itself: "
                "remove it from the config"
                for key, var in dict.fromkeys(found)
            ]
        )


def compose_checked(argv: list[str], conf_dir: str = CONF_DIR, added: set[str] | None = None) -> Composed:
    """The command line composed with its secrets refused and shadowed presets reported: every entry's first step."""
    argv = use_config_dirs(argv)
    refuse_secrets(argv)
    composed = compose(argv, conf_dir, added=added)
    report_shadows(composed.hydra, conf_dir)
    refuse_secrets([], composed.raw, composed.hydra)
    return composed
