"""One home per default: a preset YAML and its schema never disagree about a default value.

The reference preset of a kind is the YAML named after it (``adapter/lora.yaml`` for kind
``lora``) or a group's ``default.yaml`` (train, eval). Every value it sets must equal the
schema's default for that key, so a key left out of a user's own preset means the same as
the shipped one. Other presets (``model/phi2.yaml``, ``data/env_numeric.yaml``) are deliberate
variants and may differ.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import CONF
from pydantic import BaseModel

from engine.config import FIXED, registries

SKIP_INTERPOLATED = "${"


def reference_presets():
    groups = registries()
    for group, registry in groups.items():
        for path in sorted((Path(CONF) / group).glob("*.yaml")):
            node = yaml.safe_load(path.read_text()) or {}
            if node.get("kind") == path.stem and path.stem in registry:
                yield pytest.param(registry.get(path.stem).spec, node, id=f"{group}/{path.name}")
    for group, schema in FIXED.items():
        path = Path(CONF) / group / "default.yaml"
        yield pytest.param(schema, yaml.safe_load(path.read_text()), id=f"{group}/default.yaml")


def disagreements(schema: type[BaseModel], node: dict, prefix: str = "") -> list[str]:
    out = []
    for key, value in node.items():
        field = schema.model_fields.get(key)
        if key == "kind" or field is None or field.is_required():
            continue
        default = field.get_default(call_default_factory=True)
        if isinstance(default, BaseModel) and isinstance(value, dict):
            dumped = default.model_dump()
            out += [
                f"{prefix}{key}.{k}: preset {v!r} vs schema {dumped.get(k)!r}" for k, v in value.items() if dumped.get(k) != v
            ]
            continue
        if isinstance(value, str) and SKIP_INTERPOLATED in value:
            continue
        if isinstance(default, tuple):
            default = list(default)
        if value != default:
            out.append(f"{prefix}{key}: preset {value!r} vs schema {default!r}")
    return out


@pytest.mark.parametrize("schema, node", list(reference_presets()))
def test_reference_preset_matches_schema_defaults(schema, node):
    assert not disagreements(schema, node)


def test_reference_presets_cover_the_fixed_groups_and_kinds():
    ids = [p.id for p in reference_presets()]
    assert {"train/default.yaml", "eval/default.yaml", "adapter/lora.yaml", "quantization/nf4.yaml"} <= set(ids)
