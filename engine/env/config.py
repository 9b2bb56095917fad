"""The environment from engine's config: the same overrides as the command line, no weights loaded.

    env = gymnasium.make("engine/TextReward-v0", overrides=["data=env_numeric", "reward=format_numeric"], split="test")
    env = gymnasium.make("engine/TextReward-v0", overrides=["reward=suite_format"])   # suite prompts

Composes and validates through engine's front door (engine/config/: the same composition and
the same schemas as a run, scoped to the groups the environment uses: ``model``, ``data``,
``reward``; problems are one ``ConfigError`` naming each full key), then prepares the data split
with the model's *tokenizer* only (templating needs it; the weights are the RL library's
business) and renders each prompt as the evaluate stage feeds it to the model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engine.config import CONF_DIR, compose_checked
from engine.config.validation import check_groups, import_plugins
from engine.errors import ConfigError, UserError
from engine.files import cache_root
from engine.reward import REWARDS

CONF = Path(CONF_DIR)


def compose(overrides: list[str], conf_dir: str | Path = CONF) -> dict:
    """The resolved config for ``overrides``: the run's own front door (engine.config), so the
    environment sees exactly what ``engine OVERRIDES`` would run."""
    return compose_checked(list(overrides), str(Path(conf_dir).resolve())).raw


def validate(raw: dict) -> dict[str, Any]:
    """Plugins imported, then the model, data and reward specs: {group: spec} or one ConfigError.

    The run's own checks, scoped to the three groups the environment reads: the stages, the
    other groups and the rules across them are a training run's business, not an environment's.
    """
    problems: list[str] = []
    import_plugins(raw.get("plugins") or [], problems)
    specs = check_groups(raw, ["model", "data", "reward"], problems)
    if specs.get("reward") is not None and specs["reward"].kind == "none":
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
