"""The front door: compose a command line once, validate it once, freeze it, read it back.

Every entry goes through here: the CLI (``engine ...``), the Gymnasium environment
(``engine.env``), the bench scripts and the tests. No torch is imported.

- ``compose``: Hydra's compose API over the shipped ``conf/`` (and ``--config-dir`` folders);
- ``validate``: the resolved dict -> a frozen ``RunConfig`` of typed specs, or one ``ConfigError``;
- ``freeze``: the resume decision, then ``run_dir/config.yaml``;
- ``read``: ``config.yaml`` -> ``RunConfig`` for whatever executes the run (stages, ranks, sweep jobs).
"""

from engine.config.composition import CONF_DIR, Composed, compose, compose_checked, register_resolvers
from engine.config.validation import FIXED, RunConfig, parse, registries, validate


def load(argv: list[str], conf_dir: str = CONF_DIR, check: bool = True):
    """A command line -> its validated ``RunConfig`` (``check=False``: the composed dict)."""
    composed = compose_checked(argv, conf_dir)
    return validate(composed.raw) if check else composed.raw


__all__ = [
    "CONF_DIR",
    "FIXED",
    "Composed",
    "RunConfig",
    "compose",
    "compose_checked",
    "load",
    "parse",
    "register_resolvers",
    "registries",
    "validate",
]
