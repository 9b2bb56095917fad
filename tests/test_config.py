"""Every recipe composes and validates; bad configs fail with exit 2 and a message naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import CONF, ROOT, TINY, compose, needs_bnb, run_cli, run_engine

from engine.config import RunConfig
from engine.errors import ConfigError

RECIPES = sorted(p.stem for p in (ROOT / "recipes").glob("*.yaml"))


def test_recipes_exist():
    assert "lora_smollm2" in RECIPES and "qlora_phi2" in RECIPES


@pytest.mark.parametrize("recipe", [pytest.param(r, marks=[needs_bnb] if r.startswith("qlora") else []) for r in RECIPES])
def test_every_recipe_composes_and_validates(recipe):
    if recipe == "eval_run":  # needs the run it evaluates: without one it says so at validation
        with pytest.raises(ConfigError, match="eval.run_dir: not set"):
            compose([f"recipe={recipe}", *TINY])
        return
    cfg = compose([f"recipe={recipe}", *TINY])
    assert isinstance(cfg, RunConfig)
    assert cfg.recipe == recipe
    assert cfg.model.kind == "tiny"
    assert cfg.stages, "a recipe must list stages"


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_has_a_header_with_its_command(recipe):
    text = (ROOT / "recipes" / f"{recipe}.yaml").read_text()
    assert text.startswith("# @package _global_")
    assert f"python -m engine recipe={recipe}" in text or (recipe == "lora_smollm2" and "python -m engine" in text)


def test_default_recipe_is_lora_smollm2():
    cfg = compose([])
    assert cfg.recipe == "lora_smollm2"
    assert cfg.model.kind == "gguf" and cfg.adapter.kind == "lora"
    assert cfg.stages == ["prepare_data", "train", "evaluate", "report"]


@needs_bnb  # recipe qlora_phi2 quantizes
def test_command_line_overrides_beat_the_recipe():
    cfg = compose(["recipe=qlora_phi2", "model=tiny", "adapter.r=4", "train.max_steps=3"])
    assert cfg.quantization.kind == "nf4"  # from the recipe
    assert cfg.model.kind == "tiny"  # from the command line
    assert cfg.adapter.r == 4 and cfg.train.max_steps == 3


@needs_bnb  # recipe qlora_phi2 quantizes
def test_adapter_targets_follow_the_model():
    cfg = compose(["recipe=qlora_phi2"])
    assert cfg.adapter.target_modules == ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"]


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["adapter.r=abc"], ["adapter.r", "integer"]),
        (["adapter.rank=4"], ["adapter.rank", "unknown key", "did you mean 'r'"]),
        (["train.lr=-1"], ["train.lr", "greater than 0"]),
        (["adapter.r=0"], ["adapter.r", "greater than or equal to 1"]),
        (["train.schedule=cosin"], ["train.schedule", "'cosine'"]),
        (["stages=[prepare_data,trian]"], ["stages[1]", "did you mean 'train'"]),
        (["data.path=/no/such/file.jsonl"], ["data.path", "no such file"]),
        (["+color=blue"], ["color", "unknown key"]),
        (["data.split.train=0.9"], ["data.split", "sum to 1"]),
        (["plugins=[no_such_module_xyz]"], ["plugins[0]", "cannot import"]),
    ],
)
def test_invalid_values_are_reported_with_their_key(overrides, expected):
    with pytest.raises(ConfigError) as err:
        compose([*TINY, *overrides])
    message = str(err.value)
    for fragment in expected:
        assert fragment in message, message


def test_problems_are_collected_together():
    with pytest.raises(ConfigError) as err:
        compose([*TINY, "adapter.r=0", "train.lr=-1", "train.max_steps=abc"])
    assert len(err.value.problems) == 3


def test_device_not_present_is_a_config_error():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError, match="device: 'cuda' is not present"):
        compose([*TINY, "device=cuda"])


@pytest.mark.parametrize(
    "args, key",
    [
        (["recipe=nope"], "recipe: no preset 'nope'"),
        (["adapter.r=abc"], "adapter.r"),
        (["adapter.rank=4"], "adapter.rank"),
        (["train.lr=-1"], "train.lr"),
        (["model=tinyy"], "did you mean 'tiny'"),
        (["model=tiny", "stages=[]"], "stages: empty, so the run would do nothing"),
        (["model=tiny", "train.final_adapter=best"], "needs train.eval_every"),
        (["model=tiny", "train.optimizer=adamw_8bit", "device=cpu"], "train.optimizer=adamw"),
        (["model=tiny", "stages=[prepare_data,evaluate]"], "eval.run_dir: not set"),
        (["model=tiny", "stages=[prepare_data,evaluate,train]"], "stages: evaluate runs before train"),
        (["model=tiny", "stages=[prepare_data,train,archive_documents]"], "stages: archive_documents"),
    ],
)
def test_cli_exits_2_without_traceback(args, key):
    proc = run_cli(*args)
    assert proc.returncode == 2, proc.stderr
    assert key in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert len(proc.stderr.splitlines()) < 8
    assert "'max_steps'" not in proc.stderr, "the message must not dump the whole group"


def test_the_real_command_line_exits_2_without_traceback():
    """The tests above call engine.cli.main in-process; this one runs ``python -m engine`` as a user does."""
    proc = run_engine("adapter.r=abc")
    assert proc.returncode == 2, proc.stderr
    assert "adapter.r" in proc.stderr and "Traceback" not in proc.stderr + proc.stdout
    assert len(proc.stderr.splitlines()) < 8


@pytest.mark.parametrize(
    ("stages", "says"),
    [
        (
            "[evaluate,report]",
            "stages: evaluate needs prepared data (ctx.data): put prepare_data before it, "
            "e.g. stages=[prepare_data,evaluate,report]",
        ),
        (
            "[train,prepare_data,evaluate]",
            "stages: train needs prepared data (ctx.data): put prepare_data before it, e.g. stages=[prepare_data,train,evaluate]",
        ),
        ("[preview_data]", "stages: preview_data needs prepared data (ctx.data): put prepare_data before it"),
        (
            "[prepare_data,train,export_gguf]",
            "stages: export_gguf needs the merged model (run_dir/merged): put merge before it, "
            "e.g. stages=[prepare_data,train,merge,export_gguf]",
        ),
    ],
)
def test_what_a_stage_needs_comes_earlier_in_the_list(stages, says):
    """No stage runs another: the stage list is all that runs, so a missing or late prerequisite is refused."""
    with pytest.raises(ConfigError) as err:
        compose(["model=tiny", f"stages={stages}"])
    assert err.value.exit_code == 2 and says in str(err.value), str(err.value)


def test_every_needed_trait_is_given_by_a_registered_stage():
    from engine.stages import STAGES

    traits = {t for key in STAGES.keys() for t in STAGES.get(key).traits}
    needed = {t.split(":", 1)[1] for t in traits if t.startswith("needs:")}
    assert needed and {n for n in needed if f"gives:{n}" not in traits} == set()


@needs_bnb  # recipe qlora_phi2 quantizes
def test_cli_prints_composed_config():
    proc = run_cli("recipe=qlora_phi2", "--cfg", "job")
    assert proc.returncode == 0, proc.stderr
    assert "name_or_path: microsoft/phi-2" in proc.stdout
    assert "kind: nf4" in proc.stdout


def test_run_dir_pattern_is_recipe_then_timestamp():
    text = (Path(CONF) / "config.yaml").read_text()
    assert "dir: outputs/${hydra:runtime.choices.recipe}/${now:%Y-%m-%d_%H-%M-%S}" in text


def test_printing_the_config_creates_no_run_dir(tmp_path):
    proc = run_cli(*TINY, f"hydra.run.dir={tmp_path / 'run'}", "--cfg", "job")
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "run").exists()


def test_hydra_searchpath_is_composed_like_the_real_run(tmp_path):
    (tmp_path / "recipe").mkdir()
    (tmp_path / "recipe" / "mine.yaml").write_text("# @package _global_\ndefaults:\n  - override /model: tiny\nseed: 5\n")
    cfg = compose([f"hydra.searchpath=[file://{tmp_path}]", "recipe=mine"])
    assert cfg.recipe == "mine" and cfg.seed == 5


def test_lm_eval_tasks_without_lm_eval_are_refused_before_training(monkeypatch):
    """The default recipe's multiple-choice task needs lm-eval: said at validation (exit 2), not after
    the training minutes are spent (found in a fresh `pip install .` that lacked it)."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a))
    with pytest.raises(ConfigError, match=r"eval.lm_eval.tasks: \['envsci_mc'\] need the lm-eval package"):
        compose([])
    compose(["eval.lm_eval.tasks=[]"])  # without tasks the run needs no lm-eval


def test_a_recorded_stage_list_is_read_as_it_ran():
    """eval.run_dir reads runs recorded before stages declared their needs: their lists left out what ran on the way."""
    from engine.checks import stages_as_ran

    assert stages_as_ran(["train", "evaluate"]) == ["prepare_data", "train", "evaluate"]
    assert stages_as_ran(["build_index", "prepare_data", "train"]) == ["prepare_data", "build_index", "train"]
    assert stages_as_ran(["export_gguf", "check_export"]) == ["merge", "export_gguf", "prepare_data", "check_export"]
    assert stages_as_ran(["prepare_data", "train", "evaluate", "report"]) == ["prepare_data", "train", "evaluate", "report"]
