"""The stage registry, apart from the stage modules so they can import it without a cycle."""

from engine.registry import Registry

STAGES = Registry("stage")
