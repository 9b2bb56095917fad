"""The environment from engine's config: the same overrides as the command line, no weights loaded.

    env = gymnasium.make("engine/TextReward-v0", overrides=["data=env_numeric", "reward=format_numeric"], split="test")
    env = gymnasium.make("engine/TextReward-v0", overrides=["reward=suite_format"])   # suite prompts

Composes engine's conf/ with Hydra's compose API (``plugins:`` imported first), validates the
groups the environment uses (``model``, ``data``, ``reward``) with their own schemas — problems
are one ``ConfigError`` naming each full key — then prepares the data split with the model's
*tokenizer* only (templating needs it; the weights are the RL library's business) and renders
each prompt as the evaluate stage feeds it to the model.

Why not ``engine.config.validate``: that is the run layer, above this one (imports go down
only); the environment needs three groups, not a run. Cross-group run checks do not apply here.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from engine.errors import ConfigError, UserError
from engine.files import cache_root
from engine.registry import Registry

ENGINE = Path(__file__).resolve().parents[1]
CONF = ENGINE / "conf"
SAMPLES = ENGINE / "samples"


def compose(overrides: list[str], conf_dir: str | Path = CONF) -> dict:
    """The resolved config for ``overrides`` (Hydra's compose API, as the CLI composes)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import ConfigCompositionException, MissingConfigException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if not OmegaConf.has_resolver("sample"):  # ${sample:NAME}: a data file shipped in engine/samples
        OmegaConf.register_new_resolver("sample", lambda name: str(SAMPLES / name))
    overrides = list(overrides)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(Path(conf_dir).resolve()), version_base="1.3"):
            for _ in range(len(overrides) + 1):
                try:
                    cfg = hydra_compose("config", overrides=overrides)
                    break
                except ConfigCompositionException as e:
                    # A key the preset's YAML leaves out: add it, so the schema names it (valid or not).
                    key = str(e).split("Could not override '", 1)[-1].split("'", 1)[0]
                    if "Could not override" not in str(e) or f"++{key}" in " ".join(overrides):
                        raise ConfigError(str(e).splitlines()[0]) from None
                    overrides = [f"++{o}" if o.split("=", 1)[0] == key else o for o in overrides]
            return OmegaConf.to_container(cfg, resolve=True)
    except MissingConfigException as e:
        raise ConfigError(str(e).splitlines()[0]) from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"{getattr(e, 'full_key', '')}: {str(e).splitlines()[0]}".lstrip(": ")) from None
    finally:
        GlobalHydra.instance().clear()


def validate(raw: dict) -> dict[str, Any]:
    """Plugins imported, then the model, data and reward specs: {group: spec} or one ConfigError."""
    from pydantic import ValidationError

    from engine.data.shapes import SHAPES
    from engine.model import MODELS
    from engine.reward import REWARDS

    problems: list[str] = []
    for i, mod in enumerate(raw.get("plugins") or []):
        try:
            importlib.import_module(mod)
        except Exception as e:  # a plugin that fails to import is a config problem
            problems.append(f"plugins[{i}]: cannot import '{mod}': {type(e).__name__}: {e}")
    specs: dict[str, Any] = {}
    registries: dict[str, Registry] = {"model": MODELS, "data": SHAPES, "reward": REWARDS}
    for group, registry in registries.items():
        node = raw.get(group)
        kind = node.get("kind") if isinstance(node, dict) else None
        if kind not in registry:
            problems.append(f"{group}.kind: {registry.unknown_message(kind)}")
            continue
        schema = registry.get(kind).spec
        try:
            specs[group] = schema.model_validate(node)
        except ValidationError as err:
            for e in err.errors():
                key = ".".join([group, *map(str, e["loc"])])
                if e["type"] == "extra_forbidden":
                    valid = ", ".join(f for f in schema.model_fields if f != "kind") or "none"
                    problems.append(f"{key}: unknown key; valid keys here: {valid}")
                else:
                    problems.append(f"{key}: {e['msg'].replace('Value error, ', '').replace('Input should be', 'should be')}")
    if "reward" in specs and specs["reward"].kind == "none":
        valid = ", ".join(k for k in REWARDS.keys() if k != "none")
        problems.append(f"reward: none, so step() has nothing to return; choose one, e.g. reward=format_numeric (kinds: {valid})")
    if problems:
        raise ConfigError(problems)
    return specs


def load_tokenizer(model_spec):
    """The model's tokenizer without its weights (what the data's template and tokenizing need)."""
    from transformers import AutoTokenizer

    from engine import model as models

    kind = model_spec.kind
    if kind == "tiny":
        tokenizer = AutoTokenizer.from_pretrained(models.TINY_TOKENIZER)
    elif kind == "hf":
        path = models.resolve_hf(model_spec.name_or_path, model_spec.revision)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=model_spec.trust_remote_code)
    elif kind == "gguf":
        cached = cache_root() / "models" / Path(model_spec.file).stem
        if (cached / "tokenizer_config.json").is_file():  # converted by an earlier run
            tokenizer = AutoTokenizer.from_pretrained(cached)
        else:
            src = models.gguf_path(model_spec.package, model_spec.file)
            tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    else:
        raise UserError(f"model kind '{kind}': the environment cannot load its tokenizer alone; use a tiny, hf or gguf model")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def env_from_config(
    overrides: list[str] | tuple[str, ...] = (),
    *,
    split: str = "test",
    suite: str | list[str] | None = None,
    conf_dir: str | Path = CONF,
    max_items: int | None = None,
    max_chars: int = 4096,
):
    """A ``TextRewardEnv`` over a prepared data split (or a behaviour suite) of engine's config.

    Args:
        overrides: as on the command line (``["model=tiny", "data=env_numeric", "reward=numeric"]``).
        split: train, validation or test: the prompts of that prepared split.
        suite: behaviour suite name(s) or path(s) to draw the prompts from instead of the data;
            with a ``suite`` reward and no ``suite`` given, the reward's own ``suites``.
        conf_dir: engine's conf/ (or a copy of it with your presets).
        max_items: keep the first N prompts (a quick look at a big split).
    """
    from engine.data import SPLITS, prepare
    from engine.data.templates import render, template_source
    from engine.env.text import TextRewardEnv
    from engine.reward import REWARDS, items_from_examples, items_from_suite

    if split not in SPLITS:
        raise ConfigError(f"split: '{split}' is not a data split; valid: {', '.join(SPLITS)}")
    raw = compose(list(overrides), conf_dir)
    specs = validate(raw)
    reward = REWARDS.build(specs["reward"])
    tokenizer = load_tokenizer(specs["model"])
    if suite is None and specs["reward"].kind == "suite":
        suite = specs["reward"].suites
    if suite is not None:
        items = [item for name in ([suite] if isinstance(suite, str) else suite) for item in items_from_suite(name)]
    else:
        bundle = prepare(specs["data"], tokenizer, seed=raw.get("seed", 0), run_dir=None)
        items = items_from_examples(bundle.splits[split], prefix=f"{split}/")
    items = items[:max_items] if max_items else items
    source = template_source(specs["data"].template, tokenizer)
    prompts = [render(source, i.messages, add_generation_prompt=True, tokenizer=tokenizer) for i in items]
    return TextRewardEnv(items, reward, prompts=prompts, max_chars=max_chars)
