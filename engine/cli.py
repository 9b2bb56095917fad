"""The command line around Hydra: user config dirs, early validation, the run dir, user-error reporting.

Before Hydra starts, the command line is composed once, with the same config search path as
the real run, and checked: a typo, a wrong type, a secret in the config, a run dir that
cannot be written or that another process is using all exit with status 2 and a short
message instead of a traceback.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path

from hydra.core.config_search_path import ConfigSearchPath, SearchPathQuery
from hydra.plugins.search_path_plugin import SearchPathPlugin

from engine.errors import ConfigError, UserError
from engine.registry import did_you_mean

CONF_DIR = str(Path(__file__).resolve().parent / "conf")
INFO_FLAGS = {"--help", "-h", "--hydra-help", "--info", "-i", "--version", "--shell-completion", "-sc"}
CONFIG_DIR_FLAGS = ("--config-dir", "-cd")
# Hydra settings the check must compose with: where configs are found, where the run goes, env copied.
KEPT_HYDRA_KEYS = ("hydra.searchpath", "hydra.run.dir", "hydra.sweep.dir", "hydra.job.env_set")


def prepare(argv: list[str]) -> list[str]:
    """Everything before Hydra runs, for both entry points: returns Hydra's command line."""
    from engine.config import register_resolvers
    from engine.settings import export_to_environment

    register_resolvers()
    export_to_environment()
    return share_run_dir(precheck(argv, CONF_DIR))


def fail(err: UserError) -> None:
    sys.stderr.write(f"engine: {err}\n" if not isinstance(err, ConfigError) else f"engine: {err.format()}\n")
    sys.exit(err.exit_code)


class UserConfigs(SearchPathPlugin):
    """Puts ``--config-dir`` folders *before* the shipped configs on Hydra's search path.

    Hydra itself appends ``--config-dir`` after the primary config dir, so a user preset that
    has a shipped preset's name would be silently ignored. Here the user's folder wins, and
    ``report_shadows`` says so on screen. Registered once per process; ``dirs`` is set from
    the command line before every compose (the CLI's check and the real run use the same).
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


def precheck(argv: list[str], conf_dir: str) -> list[str]:
    """Compose the command line once (first value of each sweep), validate it, claim the run dir.

    Returns the command line for Hydra: ``--config-dir`` taken off (``UserConfigs`` holds it),
    an override of a key that the schema has but the chosen preset's YAML leaves out
    (``adapter.bias=all``) becomes ``++adapter.bias=all`` so Hydra's struct mode does not reject
    what the schema accepts, and a single run's dir is pinned to the one checked and locked
    here (``${now:}`` would otherwise be evaluated again, a second later).
    """
    try:
        argv = use_config_dirs(argv)
        if any(a in INFO_FLAGS or a.startswith("--info") for a in argv):
            return argv
        printing = any(a in ("--cfg", "-c") or a.startswith("--cfg=") for a in argv)
        added: set[str] = set()
        refuse_secrets(argv)
        raw, hydra = compose(argv, conf_dir, added=added)
        report_shadows(hydra, conf_dir)
        refuse_secrets([], raw, hydra)
        if not printing:
            from engine.config import validate

            validate(raw)
            from engine.sweep.spec import check_plugins

            if problems := check_plugins(argv, conf_dir, raw.get("sweep") or {}):
                raise ConfigError(problems)
            argv = claim_run_dir(argv, hydra)
    except UserError as e:
        fail(e)
    return [f"++{a}" if not a.startswith(("+", "~", "-")) and a.split("=", 1)[0] in added else a for a in argv]


def _overrides(argv: list[str]) -> list[str]:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    args = _parse_args(argv)
    try:
        parsed = OverridesParser.create().parse_overrides(args.overrides)
    except OverrideParseException as e:
        raise ConfigError(f"cannot parse the command line: {str(e).splitlines()[0]}") from None
    out = []
    for o in parsed:
        if o.key_or_group.startswith("hydra") and not o.key_or_group.startswith(KEPT_HYDRA_KEYS):
            continue
        if o.is_sweep_override():
            out.append(f"{o.get_key_element()}={_first_value(o)}")
        else:
            out.append(o.input_line)
    return out


def _first_value(o) -> str:
    """A value the sweep can give a key: the first of a choice or range, an interval's lower end
    (Optuna's search spaces: ``interval(1e-5, 1e-3)``, ``tag(log, interval(...))``)."""
    from hydra.core.override_parser.types import ValueType

    if o.value_type == ValueType.INTERVAL_SWEEP:
        start = o.value().start
        return str(int(start) if float(start).is_integer() and "int(" in o.input_line else start)
    return next(iter(o.sweep_string_iterator()))


def compose_and_validate(argv: list[str], conf_dir: str, check: bool = True, added: set[str] | None = None):
    """Compose as the CLI does (``--config-dir`` included) and validate: the tests' and bench's entry."""
    from engine.config import validate

    argv = use_config_dirs(argv)
    refuse_secrets(argv)
    raw, hydra = compose(argv, conf_dir, added=added)
    refuse_secrets([], raw, hydra)
    return validate(raw) if check else raw


def compose(argv: list[str], conf_dir: str, added: set[str] | None = None) -> tuple[dict, dict]:
    """The resolved task config (``recipe`` = the recipe's name) and the bits of Hydra's own
    config the checks need: choices, config sources, run/sweep dir, mode, overrides."""
    import yaml
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf, open_dict
    from omegaconf.errors import InterpolationResolutionError

    overrides = _overrides(argv)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=conf_dir, version_base="1.3"):
            cfg = _compose_retrying(overrides, added)
            HydraConfig.instance().set_config(cfg)
            hydra = {
                "choices": OmegaConf.to_container(cfg.hydra.runtime.choices),
                "sources": OmegaConf.to_container(cfg.hydra.runtime.config_sources),
                "run_dir": str(cfg.hydra.run.dir),
                "sweep_dir": str(cfg.hydra.sweep.dir),
                "multirun": _parse_args(argv).multirun,
                "tree": OmegaConf.to_container(cfg.hydra, resolve=False),
            }
            with open_dict(cfg):
                del cfg["hydra"]
            raw = OmegaConf.to_container(cfg, resolve=True)
    except yaml.YAMLError as e:
        raise ConfigError(_yaml_problem(e)) from None
    except InterpolationResolutionError as e:  # ${oc.env:UNSET}, ${no.such.key}
        why = str(e).splitlines()[0].split("resolving interpolation: ")[-1]
        raise ConfigError(f"{e.full_key}: cannot resolve its interpolation: {why}") from None
    finally:
        GlobalHydra.instance().clear()
    raw["recipe"] = hydra["choices"].get("recipe")
    return raw, hydra


def _compose_retrying(overrides: list[str], added: set[str] | None):
    from hydra import compose
    from hydra.errors import ConfigCompositionException, MissingConfigException

    for _attempt in range(len(overrides) + 1):
        try:
            return compose("config", overrides=overrides, return_hydra_config=True)
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


def _parse_args(argv: list[str]):
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


def report_shadows(hydra: dict, conf_dir: str) -> None:
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


def claim_run_dir(argv: list[str], hydra: dict) -> list[str]:
    """Create and lock a single run's dir before Hydra writes into it; check a sweep's dir.

    Under ``accelerate launch`` the ranks' dir is decided by ``share_run_dir`` and rank 0
    locks it in ``engine.pipeline.run``; a sweep's jobs lock their own dirs there too.
    """
    from engine.lock import acquire

    if hydra["multirun"] or str(hydra["tree"].get("mode")) == "MULTIRUN":
        make_run_dir(Path(hydra["sweep_dir"]), "hydra.sweep.dir")
        return argv
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if any(a.lstrip("+").startswith("hydra.run.dir=") for a in argv):
            make_run_dir(Path(hydra["run_dir"]), "hydra.run.dir")
        return argv
    run_dir = Path(hydra["run_dir"])
    make_run_dir(run_dir, "hydra.run.dir")
    try:
        acquire(run_dir)
    except OSError as e:
        raise ConfigError(f"hydra.run.dir: cannot write in {run_dir} ({e.strerror}); choose a writable directory") from None
    pinned = [a for a in argv if not a.startswith(("hydra.run.dir=", "+hydra.run.dir=", "++hydra.run.dir="))]
    return [*pinned, f"hydra.run.dir={_override_value(str(run_dir))}"]


def make_run_dir(run_dir: Path, key: str) -> None:
    """Create ``run_dir`` or say why it cannot be (a file in the way, no permission, /proc ...)."""
    path = run_dir.absolute()
    existing = next(p for p in (path, *path.parents) if p.exists() or p == p.parent)
    if existing.exists() and not existing.is_dir():
        raise ConfigError(
            f"{key}: {run_dir} cannot be a directory: {existing} is a file; choose another path, e.g. {key}=outputs/my_run"
        )
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(
            f"{key}: cannot create {run_dir} ({e.strerror}, under {existing}); choose a directory you can write, "
            f"e.g. {key}=outputs/my_run"
        ) from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}: {run_dir} is not writable by this user; choose another directory")


def _override_value(value: str) -> str:
    """A value Hydra's override grammar reads back unchanged (quoted if it must be; inside
    quotes Hydra keeps backslashes as they are and needs only the quote escaped)."""
    if re.fullmatch(r"[\w./:~+@%-]+", value):
        return value
    return "'" + value.replace("'", "\\'") + "'"


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


def run_task(cfg) -> float | None:
    """Hydra's task function: validate, then run the pipeline in Hydra's run dir (a sweep's job: see
    ``run_sweep_job``; it returns the job's ``sweep.objective`` value to Hydra's sweeper)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    from engine.config import validate
    from engine.pipeline import run

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    keep_local_paths_out(run_dir, hc.output_subdir)
    raw = OmegaConf.to_container(cfg, resolve=True)
    raw["recipe"] = hc.runtime.choices.get("recipe")
    if hc.mode == RunMode.MULTIRUN:
        return run_sweep_job(raw, run_dir, list(hc.overrides.task), tell_failures="optuna" in str(hc.sweeper.get("_target_")))
    try:
        validated = validate(raw)
        run(validated, run_dir)
    except UserError as e:
        fail(e)


def keep_local_paths_out(run_dir: Path, output_subdir: str | None) -> None:
    """What Hydra writes into the run dir itself, with local paths shown as ``engine.files.shown_text`` does.

    Hydra's record of its own settings (``.hydra/hydra.yaml``: the working dir, the output dir,
    the config search path) is rewritten once, before any stage runs; the log file
    (``<job>.log``, where other libraries' log lines name the files they read and write) gets a
    formatter that does the same to every line. Why not drop them: ``.hydra/`` keeps the command
    line (overrides.yaml) and the composed config as typed, and the log what libraries said. The
    terminal is left as it is: there a local path is what the user needs.
    """
    from engine.files import shown_text, write_text_atomic

    record = run_dir / output_subdir / "hydra.yaml" if output_subdir else None
    if record is not None and record.is_file():
        write_text_atomic(record, shown_text(record.read_text(), run_dir))
    here = os.path.realpath(run_dir)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler) and os.path.dirname(os.path.realpath(handler.baseFilename)) == here:
            handler.setFormatter(ShownPathsFormatter(handler.formatter, run_dir))


class ShownPathsFormatter(logging.Formatter):
    """Another formatter's lines with local paths shown (``engine.files.shown_text``)."""

    def __init__(self, inner: logging.Formatter | None, run_dir: Path):
        super().__init__()
        self.inner = inner or logging.Formatter()
        self.run_dir = run_dir

    def format(self, record: logging.LogRecord) -> str:
        from engine.files import shown_text

        return shown_text(self.inner.format(record), self.run_dir)


def run_sweep_job(raw: dict, run_dir: Path, overrides: list[str], tell_failures: bool = False) -> float | None:
    """One job of a multirun: its failure is recorded and the sweep goes on (``engine.sweep.job``).

    Hydra's basic launcher stops a multirun at the first job that raises; here the job's error
    is written to ``sweep_job.json`` and the next job runs; the entry point exits 1 at the end if
    any failed. A stop by signal or Ctrl-C (exit 128+n) still ends the sweep, with its status.
    ``tell_failures``: the sweeper learns of a failed job by an exception (Optuna), not a NaN.
    """
    from engine.config import validate
    from engine.pipeline import run
    from engine.sweep.job import run_job

    def work() -> None:
        run(validate(raw), run_dir)

    try:
        objective = (raw.get("sweep") or {}).get("objective")
        return run_job(run_dir, overrides, objective=objective, work=work, raise_failure=tell_failures)
    except UserError as e:  # only a stop gets here: the sweep ends with the job's exit status
        fail(e)
    return None
