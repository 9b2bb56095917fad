"""Every shipped recipe runs end to end, with its own stage list, on the tiny model.

A recipe is a promise that its command works. Each one runs here as a user runs it
(``python -m engine recipe=X``), with ``model=tiny`` in place of its model: its quantization,
adapter, loss, data, stage list and eval settings are its own, shrunk to one optimizer step
and two held-out examples. The run dir must then hold what each of its stages leaves there.

Recipes written for a GPU or a hub model (qlora_*, lora_tinyllama) run here too: the model is
overridden, and bitsandbytes' NF4 has CPU kernels. A setting that truly needs CUDA (a paged
optimizer) is refused at validation with exit 2 (test below); a recipe that sets one would get
its CPU override in ``CPU_OVERRIDES``, with the reason. No shipped recipe needs one today.

The runs go two at a time (most of each is single-threaded start-up) and only for the
recipes selected, so ``-k qlora_phi2`` runs one.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from conftest import HAVE_BNB, ROOT, needs_bnb, run_cli, run_engine

SERVING = {"serve_smollm2", "chat"}
"""Recipes that run until stopped: tests/test_serve.py starts the server, queries it and SIGTERMs it;
tests/test_chat.py pipes turns into the chat and stops it with EOF and with Ctrl-C."""
RECIPES = sorted(p.stem for p in (ROOT / "engine" / "conf" / "recipe").glob("*.yaml") if p.stem not in SERVING)
EVALUATED = "lora_smollm2"
"""The finished run that recipe eval_run evaluates again."""

SMALL = [
    "model=tiny",
    "device=cpu",
    "precision=fp32",
    "train.max_steps=1",
    "train.micro_batch_size=2",
    "train.grad_accum=1",
    "train.warmup_steps=0",
    "eval.max_examples=2",
    "eval.max_new_tokens=4",
    "eval.batch_size=2",
    "eval.embedding=tfidf",  # all-MiniLM would add a model load per run; the metric is the same key
    "eval.lm_eval.limit=2",
    "eval.report_examples=1",
]
CPU_OVERRIDES: dict[str, list[str]] = {}
"""recipe -> overrides of settings that need CUDA (validation refuses them on CPU, exit 2)."""


@dataclass(frozen=True)
class Run:
    recipe: str
    run_dir: Path
    returncode: int
    stderr: str


def _overrides(recipe: str, root: Path) -> list[str]:
    """The recipe's own shrinking: one step per layered level; eval_run gets a finished run dir."""
    from conftest import compose

    raw = compose([f"recipe={recipe}", "model=tiny"], check=False)
    extra = list(CPU_OVERRIDES.get(recipe, []))
    if raw["adapter"]["kind"] == "layered":
        extra.append(f"adapter.steps=[{','.join(['1'] * raw['adapter']['levels'])}]")
    if recipe == "eval_run":
        extra.append(f"eval.run_dir={root / EVALUATED}")
    return extra


def _run(recipe: str, root: Path) -> Run:
    run_dir = root / recipe
    proc = run_engine(f"recipe={recipe}", *SMALL, *_overrides(recipe, root), f"hydra.run.dir={run_dir}", timeout=300)
    return Run(recipe, run_dir, proc.returncode, proc.stderr)


def _after(first, recipe: str, root: Path) -> Run:
    first.result()
    return _run(recipe, root)


def _selected(request) -> list[str]:
    """The recipes whose tests this session runs (all, or those picked with -k)."""
    here = Path(__file__)
    chosen = {
        item.callspec.params["recipe"]
        for item in request.session.items
        if getattr(item, "path", None) == here and "recipe" in getattr(getattr(item, "callspec", None), "params", {})
    }
    if not HAVE_BNB:  # their tests skip: do not run them
        chosen = {r for r in chosen if not r.startswith("qlora")}
    if "eval_run" in chosen:
        chosen.add(EVALUATED)
    # The evaluated run first, eval_run last: its worker waits for that run to finish.
    return sorted(chosen, key=lambda r: (r != EVALUATED, r == "eval_run", r))


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory) -> dict[str, Run]:
    root = tmp_path_factory.mktemp("recipes")
    order = _selected(request)
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {}
        for recipe in order:
            if recipe == "eval_run":
                futures[recipe] = pool.submit(_after, futures[EVALUATED], recipe, root)
            else:
                futures[recipe] = pool.submit(_run, recipe, root)
        return {r: f.result() for r, f in futures.items()}


# --- what each stage leaves in the run dir ------------------------------------------------------


def _prepare_data(run: Path, cfg: dict, metrics: dict) -> None:
    assert metrics["prepare_data"]["train_examples"] > 0


def _preview_data(run: Path, cfg: dict, metrics: dict) -> None:
    assert "[[" in (run / "preview.txt").read_text()


def _train(run: Path, cfg: dict, metrics: dict) -> None:
    assert metrics["train"]["steps"] == 1
    assert len((run / "train_log.jsonl").read_text().splitlines()) == 1
    weights = "model/config.json" if cfg["adapter"]["kind"] == "none" else "adapter/adapter_config.json"
    assert (run / weights).is_file(), weights


def _train_layered(run: Path, cfg: dict, metrics: dict) -> None:
    levels = cfg["adapter"]["levels"]
    names = [f"level_{k}" for k in range(1, levels + 1)]
    assert list(metrics["train_layered"]["levels"]) == names
    assert metrics["train"]["steps"] == levels  # one step per level
    for name in names:
        assert (run / "adapter" / name / "adapter_config.json").is_file(), name


def _train_grpo(run: Path, cfg: dict, metrics: dict) -> None:
    assert metrics["train_grpo"]["steps"] == 1 and metrics["train"]["steps"] == 1
    assert "reward_mean" in json.loads((run / "train_log.jsonl").read_text().splitlines()[0])
    assert (run / "adapter" / "adapter_config.json").is_file()


def _evaluate(run: Path, cfg: dict, metrics: dict) -> None:
    from engine.evaluate.metrics import numeric_names
    from engine.evaluate.spec import EvalSpec

    ev, spec = metrics["evaluate"], EvalSpec.model_validate(cfg["eval"])  # schema defaults filled in
    names = list(spec.metrics)
    if spec.numeric.expected_value:
        names += [f"{n}_ev" for n in numeric_names(spec.metrics) if n != "parse_rate"]
    assert set(names) <= set(ev[spec.split]), f"missing metrics: {set(names) - set(ev[spec.split])}"
    assert ev["examples"] == 2
    if spec.compare_base:
        assert set(names) <= set(ev["base"][spec.split])
    for task in spec.lm_eval.tasks:
        assert 0.0 <= ev["lm_eval"][task]["acc"] <= 1.0
    rows = (run / "generations.jsonl").read_text().splitlines()
    assert len(rows) == 2 and "finetuned" in json.loads(rows[0])


def _report(run: Path, cfg: dict, metrics: dict) -> None:
    md = (run / "report.md").read_text()
    assert md.startswith(f"# Run report: {cfg['recipe']}")
    assert (run / "report.html").is_file()
    if "evaluate" in cfg["stages"]:
        assert "| metric |" in md


def _merge(run: Path, cfg: dict, metrics: dict) -> None:
    assert (run / "merged" / "config.json").is_file()
    assert list((run / "merged").glob("*.safetensors"))


def _export_gguf(run: Path, cfg: dict, metrics: dict) -> None:
    files = json.loads((run / "export" / "manifest.json").read_text())["files"]
    assert files, "export_gguf wrote no file"
    for name, entry in files.items():
        assert (run / "export" / name).is_file() and (run / "export" / name).stat().st_size == entry["bytes"], name


def _adapter_matrix(run: Path, cfg: dict, metrics: dict) -> None:
    rows = json.loads((run / "adapter_matrix.json").read_text())["rows"]
    assert rows and rows[0]["row"] == "base" and set(metrics["adapter_matrix"]["rows"]) == {r["row"] for r in rows}
    assert (run / "adapter_matrix.csv").is_file()


def _check_export(run: Path, cfg: dict, metrics: dict) -> None:
    assert metrics["check_export"]["passed"] is True
    assert metrics["check_export"]["files"], "no file was checked"


def _build_index(run: Path, cfg: dict, metrics: dict) -> None:
    assert (run / "retrieval" / "index.faiss").is_file() and (run / "retrieval" / "meta.json").is_file()
    assert metrics["build_index"]["passages"] > 0


EXPECT = {
    "adapter_matrix": _adapter_matrix,
    "build_index": _build_index,
    "merge": _merge,
    "export_gguf": _export_gguf,
    "check_export": _check_export,
    "prepare_data": _prepare_data,
    "preview_data": _preview_data,
    "train": _train,
    "train_layered": _train_layered,
    "train_grpo": _train_grpo,
    "evaluate": _evaluate,
    "report": _report,
}
"""Stage -> what it must leave behind; a recipe with a stage missing here fails until it is added."""


@pytest.mark.slow
@pytest.mark.parametrize("recipe", [pytest.param(r, marks=[needs_bnb] if r.startswith("qlora") else []) for r in RECIPES])
def test_recipe_runs_end_to_end(recipe, runs):
    run = runs[recipe]
    assert run.returncode == 0, f"recipe {recipe} failed (exit {run.returncode}):\n{run.stderr[-3000:]}"
    cfg = yaml.safe_load((run.run_dir / "config.yaml").read_text())
    metrics = json.loads((run.run_dir / "metrics.json").read_text())
    assert cfg["model"]["kind"] == "tiny"
    for stage in cfg["stages"]:
        assert stage in EXPECT, f"stage {stage} of recipe {recipe}: add what it leaves in the run dir to EXPECT"
        assert stage in metrics, f"stage {stage} recorded no metrics"
        EXPECT[stage](run.run_dir, cfg, metrics)
    if recipe == "eval_run":
        assert metrics["evaluate"]["evaluated_run"] == EVALUATED  # outside the working dir: its name only
        assert "train" not in metrics


def test_every_recipe_runs_here():
    """The parametrisation above is the recipe folder itself: a new recipe is tested without a new line."""
    assert len(RECIPES) >= 10 and {"lora_smollm2", "eval_run", "layered_smollm2", "qlora_phi2"} <= set(RECIPES)


@needs_bnb
def test_cuda_only_settings_are_refused_on_cpu_with_exit_2(tmp_path):
    """What a GPU recipe could set that this machine cannot run: refused before anything loads."""
    proc = run_cli(
        "recipe=qlora_phi2", "model=tiny", "device=cpu", "train.optimizer=paged_adamw_8bit", f"hydra.run.dir={tmp_path / 'x'}"
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "train.optimizer" in proc.stderr and "train.optimizer=adamw" in proc.stderr
    assert "Traceback" not in proc.stderr
