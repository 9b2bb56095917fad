"""EleutherAI lm-eval, run in-process on the model we already hold.

Why in-process: the fine-tuned model is a PEFT-wrapped module in memory (and the base is
the same module with the adapter disabled); handing it to ``HFLM(pretrained=model)``
scores exactly what was trained, with no save/merge/reload round trip.

Shipped tasks live next to this file (``lm_eval_tasks/``). Their ``data_files`` are
relative to the YAML. The run dir gets a copy of each YAML with its data files, as shipped:
the record of exactly which task definition produced the numbers, holding no local path.
lm-eval resolves ``data_files`` against the working directory, so what it reads is a scratch
copy of those YAMLs with the paths made absolute, in a temporary dir removed afterwards.
"""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
from pathlib import Path

import yaml

from engine.errors import UserError

SHIPPED = Path(__file__).resolve().parent / "lm_eval_tasks"


def shipped_tasks() -> list[str]:
    return sorted(yaml.safe_load(p.read_text())["task"] for p in SHIPPED.glob("*.yaml"))


def materialise_tasks(dest: Path) -> Path:
    """Copy the shipped tasks into ``dest``, YAMLs and data files as shipped (data_files relative)."""
    dest.mkdir(parents=True, exist_ok=True)
    for src in SHIPPED.glob("*.yaml"):
        shutil.copyfile(src, dest / src.name)
        for name in _data_files(yaml.safe_load(src.read_text())).values():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src.parent / name, dest / name)
    return dest


def readable_tasks(record: Path, dest: Path) -> Path:
    """The task YAMLs of ``record`` in ``dest`` with their data_files absolute, as lm-eval needs."""
    for src in record.glob("*.yaml"):
        cfg = yaml.safe_load(src.read_text())
        files = _data_files(cfg)
        if files:
            cfg["dataset_kwargs"]["data_files"] = {k: str((record / v).resolve()) for k, v in files.items()}
        (dest / src.name).write_text(yaml.safe_dump(cfg, sort_keys=False))
    return dest


def _data_files(cfg: dict) -> dict[str, str]:
    files = (cfg.get("dataset_kwargs") or {}).get("data_files")
    return files if isinstance(files, dict) else {}


def run(model, tokenizer, spec, *, work_dir: Path, batch_size: int) -> dict:
    """``simple_evaluate`` on ``spec.tasks``; returns {task: {metric: value}} (stderr dropped).

    Args:
        model: a ``PreTrainedModel`` or PEFT model (its adapter state is what gets scored).
        spec: ``eval.lm_eval`` (tasks, limit, num_fewshot, include_path).
        work_dir: where the shipped task definitions are recorded (``lm_eval_tasks/`` of the run dir).
    """
    try:
        import lm_eval.tasks  # noqa: F401  (before any work: say what to install)
    except ImportError:
        raise UserError("eval.lm_eval.tasks: needs lm-eval; install it with `pip install lm-eval==0.4.13`") from None

    for name in ("lm-eval", "lm_eval"):
        logging.getLogger(name).setLevel(logging.ERROR)
    record = materialise_tasks(work_dir)
    with tempfile.TemporaryDirectory(prefix="engine-lm-eval-") as scratch:
        return _evaluate(model, tokenizer, spec, [str(readable_tasks(record, Path(scratch)))], batch_size)


def _evaluate(model, tokenizer, spec, include: list[str], batch_size: int) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    if spec.include_path:
        include.append(str(Path(spec.include_path).expanduser().resolve()))
    # Indexing lm-eval's own ~10k task YAMLs takes tens of seconds: only when asked for one.
    manager = TaskManager(include_path=include, include_defaults=False)
    if any(t not in manager.all_tasks for t in spec.tasks):
        manager = TaskManager(include_path=include)
    missing = [t for t in spec.tasks if t not in manager.all_tasks]
    if missing:
        raise UserError(
            f"eval.lm_eval.tasks: unknown task(s) {missing}; shipped: {', '.join(shipped_tasks())} "
            "(or any lm-eval task name; datasets must be in the local HF cache when offline)"
        )
    _skip_git_probe()
    old_side = tokenizer.padding_side
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    try:
        out = simple_evaluate(
            model=lm,
            tasks=list(spec.tasks),
            num_fewshot=spec.num_fewshot,
            limit=spec.limit,
            task_manager=manager,
            log_samples=False,
            bootstrap_iters=0,
        )
    finally:
        tokenizer.padding_side = old_side
    results = {}
    for task, metrics in (out or {}).get("results", {}).items():
        clean = {}
        for key, value in metrics.items():
            name = key.split(",", 1)[0]
            if name == "sample_len":
                clean["examples"] = int(value)
                continue
            if name == "alias" or "stderr" in name or not isinstance(value, int | float):
                continue
            clean[name] = None if isinstance(value, float) and math.isnan(value) else round(float(value), 4)
        results[task] = clean
    return results


def _skip_git_probe() -> None:
    """lm-eval runs ``git describe`` for the caller's commit, kept in results engine does not read;
    outside a git repository git prints "fatal: not a git repository" on the user's console. The
    probe is skipped; an lm-eval without it (renamed, removed) has nothing to skip."""
    import lm_eval.evaluator as evaluator

    if callable(getattr(evaluator, "get_git_commit_hash", None)):
        evaluator.get_git_commit_hash = _no_commit


def _no_commit() -> None:
    return None
