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


# ---------------------------------------------------------------- one owner per concept


def test_the_plain_text_kinds_are_registered_data_kinds():
    """``templated`` is the one "this kind has no template" rule; it must name kinds that exist."""
    from engine.data.templates import PLAIN_KINDS, templated

    assert {k for k in GROUPS["data"].keys() if not templated(k)} == PLAIN_KINDS


def test_every_model_preset_has_a_display_name_without_a_local_path(tmp_path):
    """One name per model in the report, /v1/models and an index's meta.json: never a local path."""
    from engine.model import HfSpec
    from engine.model.names import display_name

    for preset, kind in preset_kinds("model").items():
        node = yaml.safe_load((Path(CONF) / "model" / f"{preset}.yaml").read_text())
        name = display_name(GROUPS["model"].get(kind).spec(**node))
        assert name and not name.startswith(("/", "~")), f"conf/model/{preset}.yaml shows as '{name}'"
    local = tmp_path / "my_model"
    local.mkdir()
    assert display_name(HfSpec(kind="hf", name_or_path=str(local))) == "my_model"
    assert display_name(HfSpec(kind="hf", name_or_path="org/model")) == "org/model"


@pytest.mark.parametrize("optimizer", ["adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"])
def test_the_optimizer_device_rule_is_one_function(optimizer):
    """Validation and the optimizer's builder both ask engine.train.spec.optimizer_problem."""
    from engine.train.spec import optimizer_problem

    assert optimizer_problem("adamw", "cpu") is None and optimizer_problem(optimizer, "cuda") is None
    assert optimizer_problem(optimizer, "mps") == (
        f"train.optimizer: {optimizer} (bitsandbytes) needs a CUDA GPU; this run is on mps: use train.optimizer=adamw"
    )
