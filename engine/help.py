"""``engine --help``: what can be chosen, read from the config folders themselves, without Hydra.

Why not Hydra's generated help: it composes every option of every group to list them (about a
second on two cores); the presets are simply the YAML files of each group folder, and a
recipe's first comment line says what it is. ``--hydra-help`` still shows Hydra's own flags.
"""

from __future__ import annotations

from pathlib import Path

from engine.config.composition import UserConfigs

USAGE = """\
usage: engine [OVERRIDE ...]            one run, e.g. engine model=tiny train.max_steps=2
       engine recipe=NAME [OVERRIDE ...]
       engine -m KEY=A,B [...]          a sweep (Hydra multirun); engine sweep DIR: its summary
       engine --cfg job [OVERRIDE ...]  print the composed config, run nothing
       engine --config-dir DIR ...      your own presets/recipes (DIR/<group>/<name>.yaml) first

Any key can be overridden: train.lr=1e-4, adapter.r=16, 'stages=[prepare_data,train]'.
Hydra's own flags: engine --hydra-help."""


def help_text(argv: list[str], conf_dir: str) -> str:
    """The usage, every group's presets and every recipe with its one-line description."""
    folders = [Path(d) for d in UserConfigs.dirs] + [Path(conf_dir)]
    groups: dict[str, set[str]] = {}
    for folder in folders:
        for preset in folder.glob("*/*.yaml"):
            if preset.parent.name != "hydra":
                groups.setdefault(preset.parent.name, set()).add(preset.stem)
    lines = [USAGE, "", "config groups (group=preset):"]
    lines += [f"  {g}: {', '.join(sorted(names))}" for g, names in sorted(groups.items()) if g != "recipe"]
    lines += ["", "recipes (recipe=NAME):"]
    for name in sorted(groups.get("recipe", ())):
        path = next(f / "recipe" / f"{name}.yaml" for f in folders if (f / "recipe" / f"{name}.yaml").is_file())
        lines.append(f"  {name:<24} {_summary(path)}")
    return "\n".join(lines)


def _summary(path: Path) -> str:
    """A recipe's first comment line after ``# @package``, without its own name."""
    for line in path.read_text().splitlines():
        text = line.lstrip("# ").strip()
        if line.startswith("#") and text and not text.startswith("@package"):
            return text.split(":", 1)[1].strip() if text.startswith(path.stem) and ":" in text else text
    return ""
