"""Schema of the ``reward`` group (light: validation imports it before anything loads), and the
helpers that make a nested spec's problems name their full key and the keys valid there."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic_core import PydanticCustomError

from engine.registry import Registry, Spec, did_you_mean

REWARDS = Registry("reward")


class NoRewardSpec(Spec):
    """No reward configured: stages that need one (train_grpo, the environment) refuse at validation."""


@REWARDS.register("none", NoRewardSpec)
def build_none(spec: NoRewardSpec):
    """No reward (the default)."""
    return None


def custom_error(loc: tuple, message: str, value: Any) -> dict:
    """A pydantic line error with our own message (validation prefixes the group's key to ``loc``)."""
    return {"type": PydanticCustomError("reward_spec", "{message}", {"message": message}), "loc": loc, "input": value}


def validate_nested(schema: type[BaseModel], node: Any, loc: tuple = (), extra: tuple[str, ...] = ()) -> tuple[Any, list[dict]]:
    """``schema.model_validate(node)``, and its problems as line errors under ``loc``.

    Why not let pydantic's own errors through: an unknown key deep inside (a term's
    ``checks.max_wrds``) would be reported with the *outer* schema's keys as the valid ones.
    Here it names the keys valid at its own depth (plus ``extra``, e.g. a term's ``weight``).
    """
    try:
        return schema.model_validate(node), []
    except ValidationError as err:
        errors = []
        for e in err.errors():
            where = (*loc, *e["loc"])
            if e["type"] == "extra_forbidden":
                key = str(e["loc"][-1])
                inner = _model_at(schema, e["loc"][:-1])
                valid = [*(extra if len(e["loc"]) == 1 else ()), *(f for f in inner.model_fields if f != "kind")] if inner else []
                listed = f"; valid keys here: {', '.join(valid)}" if valid else ""
                errors.append(custom_error(where, f"unknown key '{key}'{did_you_mean(key, valid)}{listed}", key))
            elif e["type"] == "reward_spec":  # ours, from a nested reward spec: keep the message
                errors.append(custom_error(where, e["msg"], e.get("input")))
            else:
                errors.append(
                    {"type": e["type"], "loc": where, "input": e.get("input"), **({"ctx": e["ctx"]} if "ctx" in e else {})}
                )
        return None, errors


def _model_at(schema: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The pydantic model that holds the key at ``loc`` inside ``schema`` (None if not a plain nesting)."""
    for part in loc:
        field = schema.model_fields.get(str(part))
        ann = field.annotation if field else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        schema = ann
    return schema
