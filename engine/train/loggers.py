"""Where training metrics go: train_log.jsonl always, plus TensorBoard / MLflow / W&B by config.

train_log.jsonl is the record of truth (one JSON object per optimizer step, truncated to
the checkpoint's step on resume); the others are views for people who already use them.
All of them write into the run dir and need no server or network: MLflow uses a local
file store (``mlflow ui --backend-store-uri run_dir/mlruns``), W&B runs in offline mode
(``wandb sync run_dir/wandb/offline-run-*`` uploads later). Only rank 0 creates loggers.
"""

from __future__ import annotations

from pathlib import Path

from engine.errors import UserError
from engine.render.plot import figure, png
from engine.runs import flatten

INSTALL = {"mlflow": "pip install mlflow", "wandb": "pip install wandb", "tensorboard": "pip install tensorboard"}


class Loggers:
    """Fan one record per step out to the configured sinks."""

    def __init__(self, names: list[str], run_dir: Path, *, start_step: int, config: dict):
        self.run_dir = Path(run_dir)
        self.sinks = [_SINKS[name](self.run_dir, start_step, config) for name in names]

    def log(self, record: dict) -> None:
        step = record["step"]
        scalars = {k: float(v) for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        for sink in self.sinks:
            sink.log(scalars, step)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def _need(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        top = module.split(".")[0]
        raise UserError(
            f"train.loggers: '{top}' is not installed; {INSTALL.get(top, 'pip install ' + top)} "
            f"or remove {top} from train.loggers"
        ) from None


class _TensorBoard:
    def __init__(self, run_dir: Path, start_step: int, config: dict):
        tb = _need("torch.utils.tensorboard")
        # purge_step drops events a killed attempt wrote after the checkpoint we resume from.
        self.w = tb.SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None)

    def log(self, scalars: dict, step: int) -> None:
        for k, v in scalars.items():
            self.w.add_scalar(f"train/{k}" if not k.startswith("val") else f"eval/{k}", v, step)
        self.w.flush()

    def close(self) -> None:
        self.w.close()


class _MLflow:
    def __init__(self, run_dir: Path, start_step: int, config: dict):
        mlflow = _need("mlflow")
        self.mlflow = mlflow
        mlflow.set_tracking_uri((run_dir / "mlruns").resolve().as_uri())
        mlflow.set_experiment("engine")
        id_file = run_dir / "mlruns" / "engine_run_id"
        run_id = id_file.read_text().strip() if id_file.exists() else None
        run = mlflow.start_run(run_id=run_id, run_name=run_dir.name)
        if run_id is None:
            id_file.write_text(run.info.run_id)
            mlflow.log_params({k: str(v)[:250] for k, v in flatten(config).items()})

    def log(self, scalars: dict, step: int) -> None:
        self.mlflow.log_metrics(scalars, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


class _WandB:
    def __init__(self, run_dir: Path, start_step: int, config: dict):
        wandb = _need("wandb")
        id_file = run_dir / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.exists() else wandb.util.generate_id()
        id_file.write_text(run_id)
        self.run = wandb.init(
            mode="offline", dir=str(run_dir), project="engine", name=run_dir.name, id=run_id, resume="allow", config=config
        )

    def log(self, scalars: dict, step: int) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


_SINKS = {"tensorboard": _TensorBoard, "mlflow": _MLflow, "wandb": _WandB}


def plot(log: list[dict], out: Path) -> Path | None:
    """loss.png: training loss (and validation loss where measured) and learning rate per step,
    from the train log's records (``engine.runs.read_log``)."""
    recs = [r for r in log if "loss" in r]
    if not recs:
        return None
    fig, (ax1, ax2) = figure(2, 1, size=(7, 5.5), sharex=True)
    steps = [r["step"] for r in recs]
    ax1.plot(steps, [r["loss"] for r in recs], label="train loss", lw=1)
    val = [(r["step"], r["val_loss"]) for r in recs if "val_loss" in r]
    if val:
        ax1.plot(*zip(*val, strict=True), "o-", label="validation loss", lw=1.5)
    ax1.set_ylabel("loss")
    ax1.legend()
    ax1.grid(alpha=0.3)
    ax2.plot(steps, [r["lr"] for r in recs], color="tab:green", lw=1)
    ax2.set_ylabel("learning rate")
    ax2.set_xlabel("optimizer step")
    ax2.grid(alpha=0.3)
    fig.suptitle(Path(out).parent.name)
    Path(out).write_bytes(png(fig))
    return Path(out)
