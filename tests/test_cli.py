"""The command line as a user meets it: own config folders, run-dir problems, adapter targets, entry points."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
from conftest import ROOT, TINY, compose, run_cli, run_engine

from engine.errors import ConfigError

QUICK = [*TINY, "stages=[prepare_data,train]", "train.max_steps=1", "device=cpu", "precision=fp32"]


def user_configs(root: Path) -> Path:
    """A folder outside the package: a recipe, a preset extending a shipped one, and a recipe
    that has a shipped recipe's name."""
    (root / "recipe").mkdir(parents=True)
    (root / "adapter").mkdir()
    (root / "recipe" / "my_recipe.yaml").write_text(
        textwrap.dedent("""\
            # @package _global_
            # My recipe: tiny model, my small adapter, two training steps.
            #   python -m engine --config-dir DIR recipe=my_recipe
            defaults:
              - override /model: tiny
              - override /adapter: my_lora
            stages: [prepare_data, train]
            train:
              max_steps: 2
            """)
    )
    (root / "adapter" / "my_lora.yaml").write_text("defaults:\n  - lora\n  - _self_\nr: 2\nalpha: 4\n")
    (root / "recipe" / "lora_smollm2.yaml").write_text("# @package _global_\ndefaults:\n  - override /model: tiny\nseed: 7\n")
    return root


def test_config_dir_recipe_and_preset_compose(tmp_path):
    mine = user_configs(tmp_path / "my_configs")
    cfg = compose(["--config-dir", str(mine), "recipe=my_recipe"])
    assert cfg.recipe == "my_recipe"
    assert cfg.model.kind == "tiny" and cfg.adapter.kind == "lora" and cfg.adapter.r == 2
    assert cfg.train.max_steps == 2 and cfg.stages == ["prepare_data", "train"]
    # Without the folder the same recipe is unknown, and the shipped lora_smollm2 is back.
    with pytest.raises(ConfigError, match="recipe: no preset 'my_recipe'"):
        compose(["recipe=my_recipe"])
    assert compose([]).seed == 0


def test_user_recipe_runs_by_config_alone(tmp_path):
    mine = user_configs(tmp_path / "my_configs")
    run_dir = tmp_path / "run"
    proc = run_engine("--config-dir", str(mine), "recipe=my_recipe", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "recipe: my_recipe" in (run_dir / "config.yaml").read_text()
    assert json.loads((run_dir / "adapter" / "adapter_config.json").read_text())["r"] == 2
    assert len((run_dir / "train_log.jsonl").read_text().splitlines()) == 2


def test_a_user_preset_with_a_shipped_name_wins_and_says_so(tmp_path):
    mine = user_configs(tmp_path / "my_configs")
    cfg = compose(["--config-dir", str(mine)])
    assert cfg.recipe == "lora_smollm2" and cfg.seed == 7 and cfg.model.kind == "tiny"
    proc = run_cli("--config-dir", str(mine), "--cfg", "job", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"[engine] recipe/lora_smollm2 from {mine.resolve()} shadows the shipped one" in proc.stderr
    assert "seed: 7" in proc.stdout and "[engine]" not in proc.stdout  # --cfg output stays pure YAML


def test_yaml_syntax_error_in_a_user_file_names_file_and_line(tmp_path):
    (tmp_path / "recipe").mkdir()
    bad = tmp_path / "recipe" / "broken.yaml"
    bad.write_text("# @package _global_\nseed: 3\ntrain:\n  lr: [1, 2\n  max_steps: 2\n")
    with pytest.raises(ConfigError, match=rf"{bad}:5:\d+: YAML syntax error"):
        compose(["--config-dir", str(tmp_path), "recipe=broken", *TINY])
    proc = run_cli("--config-dir", str(tmp_path), "recipe=broken", *TINY, cwd=tmp_path)
    assert proc.returncode == 2
    assert f"{bad}:5:" in proc.stderr and "line 4" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


def test_missing_config_dir_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="--config-dir: .* is not a directory"):
        compose(["--config-dir", str(tmp_path / "nope")])


@pytest.mark.parametrize("where", ["proc", "under_a_file"])
def test_impossible_run_dir_is_exit_2_before_anything_runs(tmp_path, where):
    if where == "proc":
        run_dir, named = Path("/proc/engine_test_x"), "/proc"
    else:
        (tmp_path / "a_file").write_text("not a directory")
        run_dir, named = tmp_path / "a_file" / "run", f"{tmp_path / 'a_file'} is a file"
    proc = run_cli(*QUICK, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "hydra.run.dir:" in proc.stderr and named in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert "[engine] stage" not in proc.stdout


def test_unknown_adapter_target_lists_the_models_linear_layers(tmp_path):
    proc = run_cli(*QUICK, "adapter.target_modules=[no_such_module]", f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "adapter.target_modules: no module named no_such_module" in proc.stderr
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert name in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


def test_a_target_that_matches_nothing_among_others_is_reported(capsys):
    from engine.adapter import LoraSpec, attach
    from engine.model import TinySpec, build_tiny

    model, _ = build_tiny(TinySpec(kind="tiny"))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        peft_model = attach(model, LoraSpec(kind="lora", target_modules=["q_proj", "q_porj"]))
    assert "q_porj matches no module" in capsys.readouterr().out
    # PEFT asking the model a name transformers deprecated is PEFT's warning, not shown to the user.
    assert not [str(w.message) for w in seen if "is_gradient_checkpointing" in str(w.message)]
    assert any("q_proj.lora_A" in n for n, _ in peft_model.named_parameters())


SHOW_ENV = """
import os
from engine.stages import STAGES


@STAGES.register("show_env")
def show_env(ctx):
    print("ENV", os.environ.get("TOKENIZERS_PARALLELISM"), os.environ.get("GLIBC_TUNABLES"), flush=True)
    return {}
"""


def test_console_script_main_does_what_python_m_engine_does(tmp_path):
    """The ``engine`` script calls ``engine.__main__:main``: it must set the same environment
    (huge-page heap restart, tokenizer threads) as ``python -m engine``."""
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["engine"] == "engine.__main__:main"
    (tmp_path / "show_env_plugin.py").write_text(SHOW_ENV)
    drop = ("TOKENIZERS_PARALLELISM", "GLIBC_TUNABLES", "ENGINE_HUGE_PAGES")
    env = {k: v for k, v in os.environ.items() if k not in drop} | {"PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}
    args = [*TINY, "plugins=[show_env_plugin]", "stages=[show_env]"]
    outs = []
    for i, launcher in enumerate((["-m", "engine"], ["-c", "from engine.__main__ import main; main()"])):
        cmd = [sys.executable, *launcher, *args, f"hydra.run.dir={tmp_path / f'run{i}'}"]
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        outs.append(next(line for line in proc.stdout.splitlines() if line.startswith("ENV")))
    assert outs[0] == outs[1]
    assert outs[0].startswith("ENV false ")
    from engine.speed.memory import huge_pages_env

    if huge_pages_env({}) is not None:  # this machine gains from the huge-page heap: both restarted with it
        assert "glibc.malloc.hugetlb=1" in outs[0]
