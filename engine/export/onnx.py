"""The merged HF model as ONNX with a KV cache, and the onnxruntime side that runs it.

The graph takes ``input_ids``, ``attention_mask`` (past + new tokens), ``position_ids`` and
``past_key_values.<layer>.key/value`` (batch, kv heads, past length, head dim; length 0 on
the first step) and returns ``logits`` and ``present.<layer>.key/value``: the layout
onnxruntime-genai and optimum's decoders use, so one graph serves the prompt and each
generated token.

Why torch's TorchScript exporter (``dynamo=False``): with torch 2.13 and transformers 5.24 it
exports the tiny Llama in ~1.5 s and matches HF within 1e-6, offline. The dynamo exporter (the
default since torch 2.9) matched as well but took ~12.7 s and needs ``onnxscript``; optimum was
not tried. torch marks the TorchScript path deprecated: torch is pinned, and when it goes, the
switch is ``dynamo=True`` with ``dynamic_shapes`` in place of ``dynamic_axes``.
"""

from __future__ import annotations

import inspect
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

from engine.errors import UserError

OPSET = 17
EXTERNAL_DATA_BYTES = 1 << 30
"""Above this many weight bytes the weights go to ``<name>.data`` (protobuf caps a file at 2 GiB)."""


def write_onnx(merged: Path, path: Path, *, _perturb: Callable | None = None) -> list[Path]:
    """Export the HF model dir ``merged`` to ``path``; returns the files written (graph, then weights if separate).

    ``_perturb`` (tests only) edits the loaded model before export, so a test can write a file
    that loads and runs but no longer is the model, and see check_export catch it.
    """
    _require("onnx")
    import onnx
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    if _perturb is not None:
        _perturb(model)
    wrapper = _with_cache(model)
    example = wrapper.example_inputs()
    layers = model.config.num_hidden_layers
    past_names, present_names = _cache_names("past_key_values", layers), _cache_names("present", layers)
    new, total = {0: "batch", 1: "new"}, {0: "batch", 1: "total"}
    axes = {"input_ids": new, "attention_mask": total, "position_ids": new, "logits": new}
    axes |= {n: {0: "batch", 2: "past"} for n in past_names} | {n: {0: "batch", 2: "total"} for n in present_names}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.stem}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    with torch.no_grad(), warnings.catch_warnings():
        # The tracer warns at every Python branch on a shape in transformers' mask code; the
        # example step (past and several new tokens) takes the general branch, and the tests
        # run the graph on prompt-only and one-token steps too.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            wrapper,
            example,
            str(tmp / path.name),
            input_names=["input_ids", "attention_mask", "position_ids", *past_names],
            output_names=["logits", *present_names],
            dynamic_axes=axes,
            opset_version=OPSET,
            dynamo=False,
        )
    # Re-save as one graph file (+ one weights file when large): the exporter may scatter
    # one file per tensor beside the graph for big models.
    graph = onnx.load(str(tmp / path.name))
    large = sum(p.numel() * p.element_size() for p in model.parameters()) > EXTERNAL_DATA_BYTES
    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)
    onnx.save_model(graph, str(path), save_as_external_data=large, all_tensors_to_one_file=True, location=data.name)
    shutil.rmtree(tmp, ignore_errors=True)
    return [path, data] if large else [path]


def _require(module: str) -> None:
    """A missing optional package is a setup problem with a one-line fix, not a traceback."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise UserError(f"ONNX export needs the '{module}' package: pip install onnx onnxruntime (both are in the export extra)")


def _cache_names(prefix: str, layers: int) -> list[str]:
    return [f"{prefix}.{i}.{part}" for i in range(layers) for part in ("key", "value")]


def _with_cache(model):
    """The model with flat tensors in and out around its own cache object, so the exporter sees only tensors.

    The class is built here because torch is imported lazily (the package imports without it).
    """
    import torch

    class WithCache(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model
            self.layers = model.config.num_hidden_layers
            # transformers 5.24 names the argument ``cache``; earlier 5.x ``past_key_values``.
            params = inspect.signature(model.forward).parameters
            self.cache_arg = "cache" if "cache" in params else "past_key_values"

        def forward(self, input_ids, attention_mask, position_ids, *past):
            from transformers import DynamicCache

            cache = DynamicCache(config=self.model.config)
            for i in range(self.layers):
                cache.update(past[2 * i], past[2 * i + 1], i)
            kwargs = {self.cache_arg: cache}
            out = self.model(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True, **kwargs
            )
            # The cache object was updated in place: its layers now hold past + new keys/values.
            present = [t for layer in cache.layers for t in (layer.keys, layer.values)]
            return (out.logits, *present)

        def example_inputs(self):
            """A step with a non-empty past and several new tokens: the general case the graph must cover."""
            config = self.model.config
            kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
            head = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
            past_len, new = 3, 5
            ids = torch.randint(0, config.vocab_size, (1, new))
            mask = torch.ones(1, past_len + new, dtype=torch.long)
            positions = torch.arange(past_len, past_len + new)[None]
            past = [torch.zeros(1, kv, past_len, head) for _ in range(2 * self.layers)]
            return (ids, mask, positions, *past)

    return WithCache(model)


# --- running it --------------------------------------------------------------------------


class OnnxLM:
    """An exported file in onnxruntime: full-sequence logits and greedy decoding through the KV cache."""

    def __init__(self, path: Path, *, threads: int | None = None):
        _require("onnxruntime")
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.past_inputs = [i for i in self.session.get_inputs() if i.name.startswith("past_key_values.")]

    def step(self, ids: list[int], past: list[np.ndarray] | None, start: int) -> tuple[np.ndarray, list[np.ndarray]]:
        """Logits of ``ids`` (positions start, start+1, ...) after ``past``; returns (logits, present)."""
        if past is None:
            past = [np.zeros((1, i.shape[1], 0, i.shape[3]), dtype=np.float32) for i in self.past_inputs]
        feed = {
            "input_ids": np.array([ids], dtype=np.int64),
            "attention_mask": np.ones((1, start + len(ids)), dtype=np.int64),
            "position_ids": np.arange(start, start + len(ids), dtype=np.int64)[None],
        }
        feed |= {i.name: p for i, p in zip(self.past_inputs, past, strict=True)}
        logits, *present = self.session.run(None, feed)
        return logits[0], present

    def logits(self, ids: list[int]) -> np.ndarray:
        return self.step(ids, None, 0)[0]

    def greedy(self, prompt: list[int], n: int) -> list[int]:
        """n argmax tokens: the prompt once, then one token per step on the returned cache."""
        logits, past = self.step(list(prompt), None, 0)
        out: list[int] = []
        for _ in range(n):
            out.append(int(logits[-1].argmax()))
            logits, past = self.step(out[-1:], past, len(prompt) + len(out) - 1)
        return out
