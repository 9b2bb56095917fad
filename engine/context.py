"""The run: the frozen config every stage reads, and the context stages share.

``RunConfig`` is what validation (engine/config.py) produces: one typed spec per config
group, frozen. ``RunContext`` is what the pipeline hands each stage: the config and run dir
(both read-only), the accelerator, the prepared data, the model (built once, on first use)
and the metrics so far. Its fields are declared here and nowhere else (``slots``): a stage
cannot hang ad-hoc attributes on it or swap the config under the stages that follow.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.files import write_json_atomic
from engine.serve.backend import BackendSource
from engine.speed.imports import lean_call

if TYPE_CHECKING:  # the specs' packages sit below this layer only for type checkers
    from accelerate import Accelerator

    from engine.data import DataBundle
    from engine.data.spec import DataSpec
    from engine.evaluate.spec import EvalSpec
    from engine.export import GgufExportSpec
    from engine.loss.ce import CESpec
    from engine.model import ModelSpec
    from engine.registry import Spec
    from engine.retrieval.run import RetrievalState
    from engine.rl.spec import GrpoSpec
    from engine.serve import ServeSpec
    from engine.sweep.spec import SweepSpec
    from engine.train.spec import TrainSpec


@dataclass(frozen=True)
class EvaluatedRun:
    """A finished run that this one evaluates again (``eval.run_dir``), resolved at validation."""

    path: Path
    adapter_dir: Path | None
    """Its PEFT adapter (loaded onto the base), or None after a full fine-tune."""
    base_model: ModelSpec | None = None
    """After a full fine-tune: the original base's spec (the ``base`` variant of the comparison)."""


@dataclass(frozen=True)
class RunConfig:
    """The validated run: typed specs for every group plus the resolved dict."""

    recipe: str
    stages: list[str]
    plugins: list[str]
    seed: int
    device: str
    precision: str
    model: ModelSpec
    quantization: Spec
    """NoQuantSpec, FourBitSpec or Int8Spec (engine/quantization/): ``kind`` says which."""
    adapter: Spec
    """NoAdapterSpec or a LoraSpec (lora, dora, rslora, layered) (engine/adapter/)."""
    loss: CESpec
    data: DataSpec
    train: TrainSpec
    eval: EvalSpec
    raw: dict
    export: GgufExportSpec | None = None
    """What leaves Python after training (engine/export/): formats and parity thresholds."""
    serve: ServeSpec | None = None
    """The HTTP server of the serve stage (engine/serve/): backend, address, key, adapter dirs."""
    retrieval: Spec | None = None
    """The retrieval index and how its passages enter prompts (engine/retrieval/); kind none = off."""
    sweep: SweepSpec | None = None
    """What a multirun optimises and plots (engine/sweep/spec.py); read by the sweep job wrapper only."""
    reward: Spec | None = None
    """What a generated answer is worth (engine/reward/): train_grpo and the Gymnasium environment read it."""
    grpo: GrpoSpec | None = None
    """How train_grpo samples and updates (engine/rl/spec.py); the optimizer and length are train's."""
    evaluated_run: EvaluatedRun | None = None


_FIXED = ("cfg", "run_dir")


@dataclass(slots=True)
class RunContext:
    cfg: RunConfig
    """The validated config; read-only (stages that need a variant pass it to a package)."""
    run_dir: Path
    """Where everything this run writes goes; read-only."""
    accelerator: Accelerator
    metrics: dict = field(default_factory=dict)
    """Every stage's metrics so far, nested by stage name (mirrors metrics.json)."""
    data: DataBundle | None = None
    """The prepared data (set by prepare_data)."""
    retrieval: RetrievalState | None = None
    """The loaded index and each split with and without passages (set by build_index)."""
    _model: Any = None
    _tokenizer: Any = None

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _FIXED and hasattr(self, name):
            raise AttributeError(f"RunContext.{name} is read-only: pass a changed copy to the package that needs it")
        object.__setattr__(self, name, value)

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def record(self, stage: str, metrics: dict) -> None:
        """Merge a stage's metrics into metrics.json (nested by stage name; rank 0 writes)."""
        self.metrics.setdefault(stage, {}).update(metrics)
        if self.is_main:
            write_json_atomic(self.run_dir / "metrics.json", self.metrics)

    def training_inputs(self) -> dict[str, Any]:
        """What every trainer's job (``TrainJob``, ``GrpoJob``) takes from the run, as keywords:
        the stage adds what is its own (the loss, the GRPO settings and reward)."""
        cfg = self.cfg
        return {
            "run_dir": self.run_dir,
            "accelerator": self.accelerator,
            "model": self.model(),
            "tokenizer": self.tokenizer(),
            "data": self.data,
            "train": cfg.train,
            "seed": cfg.seed,
            "model_spec": cfg.model,
            "config": cfg.raw,
        }

    def backend_source(self) -> BackendSource:
        """What a serving backend (serve, chat, adapter_matrix) takes from the run besides its preset."""
        cfg, run = self.cfg, self.cfg.evaluated_run
        return BackendSource(
            model=cfg.model,
            quantization=cfg.quantization,
            adapter=cfg.adapter,
            evaluated=run.path if run else None,
            out_dir=self.run_dir,
        )

    def tokenizer(self):
        if self._tokenizer is None:
            self.model()
        return self._tokenizer

    def model(self):
        """Base model (quantized as configured) with the adapter applied; built once."""
        if self._model is None:
            from engine.adapter import build_for_run

            evaluated = self.cfg.evaluated_run
            cfg = self.cfg

            def build():
                return build_for_run(
                    cfg.model,
                    cfg.quantization,
                    cfg.adapter,
                    adapter_dir=evaluated.adapter_dir if evaluated else None,
                    progress=self.is_main,
                )

            # The first import of transformers and peft happens here: without what this run never uses.
            (self._model, self._tokenizer), notice = lean_call(build, quantized=cfg.quantization.kind != "none")
            if notice and self.is_main:
                print(notice, flush=True)
        return self._model
