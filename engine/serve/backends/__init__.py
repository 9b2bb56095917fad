"""One module per ``serve`` kind, and ``open_backend``: the one way the stages open any of them.

Importing this package registers every kind in ``SERVERS``. Each module imports its heavy
library (torch, llama_cpp) inside the builder, so listing the kinds (validation, ``--help``)
stays cheap. Adding a backend: one module here with ``@SERVERS.register("<kind>", <Spec>)`` on a
builder of the shared signature (engine/serve/backend.py), imported below, and one preset YAML
in engine/conf/serve/ whose ``kind`` is that key.
"""

from __future__ import annotations

from pathlib import Path

from engine.errors import ConfigError
from engine.serve import SERVERS, ServeSpec
from engine.serve.adapters import AdapterDirs, AdapterPathError, Found
from engine.serve.backend import BackendSource, Opened
from engine.serve.backends import hf, llamacpp  # noqa: F401  (registers the kinds)


def open_backend(spec: ServeSpec, source: BackendSource) -> Opened:
    """The ``serve`` preset's backend with serve.adapters and the run of ``source.evaluated`` loaded.

    Args:
        spec: the serve preset; its ``kind`` picks the builder.
        source: the base, and the finished run whose trained weights are served (if any).
    """
    fence = adapter_fence(spec, source.evaluated)
    adapters: dict[str, Found] = {}
    for name, given in spec.adapters.items():
        try:
            adapters[name] = fence.resolve(given)
        except AdapterPathError as e:
            raise ConfigError(f"serve.adapters.{name}: {e}") from None
    return SERVERS.build(spec, source=source, adapters=adapters)


def adapter_fence(spec: ServeSpec, evaluated: Path | None) -> AdapterDirs:
    """Where adapters may load from: serve.adapter_dirs, plus the evaluated run's dir."""
    return AdapterDirs([*spec.adapter_dirs, *([evaluated] if evaluated else [])])
