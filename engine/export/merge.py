"""Fold a run's trained adapter(s) into the base and write a standard HF model dir.

Why rebuild instead of merging the training model in place: the export must be what was
*saved* (adapter/ on disk), not whatever state the training objects are in (fused LoRA
layers, dropout, a 4-bit base). A quantized base is built as it was trained and then
de-quantized, so the merged weights are the ones the adapter learned against.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.errors import UserError
from engine.files import shown_path


@dataclass(frozen=True)
class Trained:
    """Where a run's trained weights are: a PEFT adapter dir (levels for layered) or a full model dir."""

    adapter_dir: Path | None = None
    model_dir: Path | None = None
    levels: list[int] = field(default_factory=list)
    """Layered adapters: the levels stacked (adapter_dir/level_K), each with its scale."""
    scales: list[float] = field(default_factory=list)

    @property
    def is_lora(self) -> bool:
        return self.adapter_dir is not None


def find_trained(run_dir: Path, *, scales: list[float] | None = None) -> Trained:
    """The trained weights of a finished run dir (adapter/, adapter/level_K, or model/)."""
    adapter = run_dir / "adapter"
    if (adapter / "adapter_config.json").is_file():
        return Trained(adapter_dir=adapter)
    levels = sorted(int(p.parent.name.rsplit("_", 1)[1]) for p in adapter.glob("level_*/adapter_config.json"))
    if levels:
        scales = list(scales or []) or [1.0] * len(levels)
        return Trained(adapter_dir=adapter, levels=levels, scales=scales)
    if (run_dir / "model" / "config.json").is_file():
        return Trained(model_dir=run_dir / "model")
    raise UserError(f"{run_dir} has no trained weights (adapter/, adapter/level_K or model/); did its train stage finish?")


def trained_weights(run_dir: Path, evaluated: Path | None, adapter_spec: Any) -> Trained:
    """This run's trained weights, or those of the finished run it works on (``eval.run_dir``: its path).

    ``adapter_spec`` gives a layered run's ``scales`` (the levels stack with them).
    """
    return find_trained(evaluated or run_dir, scales=getattr(adapter_spec, "scales", None))


def merge_trained(trained: Trained, out_dir: Path, *, model_spec: Any, quant_spec: Any, data_spec: Any) -> Path:
    """The trained weights folded into the (de-quantized) base, saved with the training template at ``out_dir``:
    the one the run recorded with its weights (``engine.data.templates.recorded_template``)."""
    from engine.data.templates import recorded_template

    model, tokenizer = load_trained(model_spec, quant_spec, trained, progress=True)
    source = trained.adapter_dir or trained.model_dir
    template = recorded_template(source.parent) or training_template(data_spec, tokenizer)  # runs before the record
    return merge_to_dir(model, tokenizer, out_dir, chat_template=template)


def merged_record(out_dir: Path, trained: Trained, *, run_dir: Path, evaluated: Path | None) -> dict:
    """What metrics.json records of a merge, with paths as ``shown_path`` records them: ``from`` is
    relative to the run that trained the weights, and ``run`` (with eval.run_dir) names that run."""
    source = trained.adapter_dir or trained.model_dir
    return {
        "dir": shown_path(out_dir, run_dir),
        "bytes": dir_bytes(out_dir),
        "from": shown_path(source, evaluated or run_dir),
        **({"run": shown_path(evaluated)} if evaluated else {}),
        "levels": trained.levels,
        "scales": trained.scales,
    }


def load_base(model_spec, quant_spec, *, progress: bool = False):
    """The base model as the adapter was trained on it, as plain float weights; returns (model, tokenizer)."""
    from engine.model import MODELS
    from engine.quantization import QUANTIZATIONS

    qconfig = QUANTIZATIONS.build(quant_spec)
    model, tokenizer = MODELS.build(model_spec, quantization_config=qconfig, progress=progress)
    if qconfig is not None:
        # De-quantize: the adapter learned against the quantized weights, not the original ones.
        model = model.dequantize()
        _forget_quantization(model)
    return model.float().eval(), tokenizer


def _forget_quantization(model) -> None:
    """A de-quantized (or GGUF-loaded) model still says it is quantized and refuses save_pretrained."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False


def load_trained(model_spec, quant_spec, trained: Trained, *, progress: bool = False):
    """The fine-tuned model, adapters not merged (PEFT) or the full model; returns (model, tokenizer)."""
    if trained.model_dir is not None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(trained.model_dir)
        return model.float().eval(), AutoTokenizer.from_pretrained(trained.model_dir)
    base, tokenizer = load_base(model_spec, quant_spec, progress=progress)
    if trained.levels:
        from engine.adapter import load_stacked

        return load_stacked(base, trained.adapter_dir, trained.levels, trained.scales), tokenizer
    from peft import PeftModel

    return PeftModel.from_pretrained(base, trained.adapter_dir).eval(), tokenizer


def merge_to_dir(model, tokenizer, out_dir: Path, *, chat_template: str) -> Path:
    """Merge (if PEFT) and save a plain HF model dir that ``from_pretrained`` loads as is.

    Written to a temporary dir and renamed into place, so a half-written dir is never taken
    for a finished one. ``chat_template`` is the training template, saved with the tokenizer.
    """
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    _forget_quantization(model)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(tmp)
    gen = model.generation_config
    gen.eos_token_id, gen.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    gen.bos_token_id = tokenizer.bos_token_id
    gen.save_pretrained(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir


def adapter_config(trained: Trained, level: int | None = None) -> dict:
    """The PEFT adapter_config.json of a trained adapter (one level's, for layered)."""
    where = trained.adapter_dir / (f"level_{level}" if level is not None else "")
    return json.loads((where / "adapter_config.json").read_text())


def training_template(data_spec, tokenizer) -> str:
    """The chat template the model was trained with (the tokenizer's own for plain-text data)."""
    from engine.data.templates import template_source, templated

    if not templated(data_spec.kind):
        return getattr(tokenizer, "chat_template", None) or ""
    return template_source(data_spec.template, tokenizer)


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
