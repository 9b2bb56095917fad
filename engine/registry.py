"""Registries: short config keys -> (typed spec, builder).

Why: a config names a component by a short, closed key (``kind: lora``), never by an
import path. Each config group owns one ``Registry``; the preset YAML's ``kind``, the
registry key and the builder function share one name. Plugins add entries by importing
this module and calling ``register`` (see ``plugins:`` in conf/config.yaml).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    """Base for fixed schemas (train, eval): unknown keys are errors, values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Spec(BaseModel):
    """Base for every preset schema: unknown keys are errors, values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    kind: str
    """Registry key of the component this preset builds."""


@dataclass(frozen=True)
class Entry:
    key: str
    spec: type[Spec]
    builder: Callable[..., Any]
    summary: str
    traits: frozenset[str] = frozenset()
    """What validation may rely on without running it, e.g. a stage's ``trains``."""


class Registry:
    """A named table of components for one config group (``adapter``, ``stage`` ...)."""

    def __init__(self, group: str):
        self.group = group
        self._entries: dict[str, Entry] = {}

    def register(self, key: str, spec: type[Spec] = Spec, *, traits: tuple[str, ...] = ()) -> Callable[[Callable], Callable]:
        """Decorator: ``@ADAPTERS.register("lora", LoraSpec)`` on the builder.

        ``traits`` are facts the config checks use before anything runs, e.g.
        ``STAGES.register("train", traits=("trains",))``: this stage produces trained weights.
        """

        def deco(builder: Callable) -> Callable:
            if key in self._entries:
                raise ValueError(f"{self.group} '{key}' is already registered")
            doc = (builder.__doc__ or "").strip().splitlines()
            self._entries[key] = Entry(key, spec, builder, doc[0] if doc else "", frozenset(traits))
            return builder

        return deco

    def keys(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def get(self, key: str) -> Entry:
        if key not in self._entries:
            raise KeyError(self.unknown_message(key))
        return self._entries[key]

    def build(self, spec: Spec, /, **runtime: Any) -> Any:
        """Build the component named by ``spec.kind``; runtime objects go in as kwargs."""
        return self.get(spec.kind).builder(spec, **runtime)

    def unknown_message(self, key: object) -> str:
        return f"unknown {self.group} '{key}'{did_you_mean(str(key), self.keys())}; valid: {', '.join(self.keys())}"


def did_you_mean(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=2, cutoff=0.5)
    return f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
