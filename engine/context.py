"""The run context: what stages share (config, run dir, accelerator, model, data, metrics)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.checkpoint import write_text_atomic
from engine.config import RunConfig


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, default=str))


@dataclass
class RunContext:
    cfg: RunConfig
    run_dir: Path
    accelerator: Any
    metrics: dict = field(default_factory=dict)
    data: Any = None
    """The prepared ``DataBundle`` (set by prepare_data)."""
    _model: Any = None
    _tokenizer: Any = None
    adapter_dir: Path | None = None
    """A trained PEFT adapter to load onto the base instead of a fresh one (eval of a finished run)."""

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def record(self, stage: str, metrics: dict) -> None:
        """Merge a stage's metrics into metrics.json (nested by stage name; rank 0 writes)."""
        self.metrics.setdefault(stage, {}).update(metrics)
        if self.is_main:
            write_json_atomic(self.run_dir / "metrics.json", self.metrics)

    def tokenizer(self):
        if self._tokenizer is None:
            self.model()
        return self._tokenizer

    def model(self):
        """Base model (quantized as configured) with the adapter applied; built once."""
        if self._model is None:
            from engine.adapter import ADAPTERS
            from engine.model import MODELS
            from engine.quantization import QUANTIZATIONS

            cfg = self.cfg
            qconfig = QUANTIZATIONS.build(cfg.quantization)
            model, tok = MODELS.build(cfg.model, quantization_config=qconfig, progress=self.is_main)
            if qconfig is not None:
                from peft import prepare_model_for_kbit_training

                model = prepare_model_for_kbit_training(
                    model, use_gradient_checkpointing=cfg.model.gradient_checkpointing
                )
            elif cfg.model.gradient_checkpointing:
                model.gradient_checkpointing_enable()
                model.enable_input_require_grads()
            if self.adapter_dir is not None:
                from peft import PeftModel

                self._model = PeftModel.from_pretrained(model, self.adapter_dir)
            else:
                self._model = ADAPTERS.build(cfg.adapter, model=model)
            self._tokenizer = tok
        return self._model
