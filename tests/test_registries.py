"""conf/ and the registries stay in sync: one name in three places."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import CONF

from engine.config import registries
from engine.registry import Registry, Spec
from engine.stages import STAGES

GROUPS = registries()


def preset_kinds(group: str) -> dict[str, str]:
    return {p.stem: yaml.safe_load(p.read_text())["kind"] for p in (Path(CONF) / group).glob("*.yaml")}


@pytest.mark.parametrize("group", sorted(GROUPS))
def test_every_preset_kind_is_registered(group):
    for preset, kind in preset_kinds(group).items():
        assert kind in GROUPS[group], f"conf/{group}/{preset}.yaml: kind '{kind}' is not registered"


@pytest.mark.parametrize("group", sorted(GROUPS))
def test_every_registered_kind_has_a_preset(group):
    kinds = set(preset_kinds(group).values())
    for key in GROUPS[group].keys():
        assert key in kinds, f"{group} '{key}' is registered but no conf/{group}/*.yaml uses it"


def test_presets_validate_against_their_spec():
    for group, registry in GROUPS.items():
        for p in (Path(CONF) / group).glob("*.yaml"):
            node = yaml.safe_load(p.read_text())
            fields = registry.get(node["kind"]).spec.model_fields
            unknown = set(node) - set(fields)
            assert not unknown, f"conf/{group}/{p.name}: keys {unknown} are not in the spec"


def test_registry_refuses_duplicates_and_suggests():
    reg = Registry("thing")
    reg.register("alpha", Spec)(lambda spec: 1)
    with pytest.raises(ValueError, match="already registered"):
        reg.register("alpha", Spec)(lambda spec: 2)
    with pytest.raises(KeyError, match="did you mean 'alpha'"):
        reg.get("alpah")


def test_builtin_stages_are_registered():
    for name in ["prepare_data", "train", "evaluate", "report"]:
        assert name in STAGES
