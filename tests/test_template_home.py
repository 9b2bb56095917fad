"""One template home: a run's chat template is recorded with its weights and every path renders with it.

Training renders with ``data.template``; the run records that template beside its adapter
(``adapter/chat_template.jinja``); merge saves it with the merged tokenizer, export_gguf embeds it,
and both serving backends render a chat with it, through the one renderer
(``engine.data.templates.render``). So a run trained with a template that is not its tokenizer's
own (here alpaca, on the tiny model whose tokenizer carries ChatML) is served exactly the prompt ids
it trained on, on transformers and on llama.cpp.
"""

from __future__ import annotations

import importlib.util

import pytest
from conftest import QUICK_TRAIN, compose

needs_llama_cpp = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python is not installed")


@pytest.fixture(scope="module")
def alpaca_run(tmp_path_factory):
    from engine.pipeline import run

    run_dir = tmp_path_factory.mktemp("alpaca") / "run"
    overrides = [*QUICK_TRAIN, "data.limit=8", "data.template=alpaca", "train.max_steps=1", "export.formats=[f32]"]
    ctx = run(compose([*overrides, "stages=[prepare_data,train,merge,export_gguf]"]), run_dir)
    return ctx, run_dir


def _served_ids(kind: str, ctx, run_dir, messages, out_dir) -> list[int]:
    from engine.serve.backend import BackendSource
    from engine.serve.backends import open_backend
    from engine.serve.backends.hf import HfSpec
    from engine.serve.backends.llamacpp import LlamaCppSpec

    spec = HfSpec(kind="hf", device="cpu") if kind == "hf" else LlamaCppSpec(kind="llamacpp", threads=1, context_length=512)
    cfg = ctx.cfg
    source = BackendSource(
        model=cfg.model, quantization=cfg.quantization, adapter=cfg.adapter, evaluated=run_dir, out_dir=out_dir
    )
    opened = open_backend(spec, source)
    try:
        return opened.backend.render_chat(messages)
    finally:
        opened.backend.close()


@needs_llama_cpp
@pytest.mark.parametrize("kind", ["hf", "llamacpp"])
def test_a_run_trained_with_a_non_default_template_is_served_its_training_ids(alpaca_run, kind, tmp_path):
    from engine.data.templates import ALPACA, TEMPLATE_FILE

    ctx, run_dir = alpaca_run
    tokenizer = ctx.tokenizer()
    assert (run_dir / "adapter" / TEMPLATE_FILE).read_text() == ALPACA  # recorded with the adapter
    assert tokenizer.chat_template != ALPACA  # the tokenizer's own is another (ChatML)
    for example in list(ctx.data.splits["train"])[:3]:
        prompt = tokenizer(ctx.data.prompt_text(example, tokenizer), add_special_tokens=False).input_ids
        assert list(example.input_ids[: len(prompt)]) == prompt  # the ids training saw before the answer
        assert _served_ids(kind, ctx, run_dir, example.prompt_messages, tmp_path) == prompt


def test_the_merged_dir_and_the_gguf_carry_the_recorded_template(alpaca_run):
    import json

    from engine.data.templates import ALPACA
    from engine.export import gguf_header_string

    _, run_dir = alpaca_run
    assert (run_dir / "merged" / "chat_template.jinja").read_text() == ALPACA
    files = json.loads((run_dir / "export" / "manifest.json").read_text())["files"]
    assert "model-f32.gguf" in files
    pytest.importorskip("gguf")
    import gguf

    reader = gguf.GGUFReader(run_dir / "export" / "model-f32.gguf")
    field = reader.fields["tokenizer.chat_template"]
    assert bytes(field.parts[field.data[0]]).decode() == ALPACA
    assert gguf_header_string  # the header reader stays the validation-time path (first keys only)


def test_the_one_renderer_holds_what_hub_templates_use():
    """loopcontrols and tojson, as transformers' renderer has them: one environment for every template."""
    from engine.data.templates import render

    source = "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m['content'] | tojson }}{% endfor %}"
    messages = [{"role": "user", "content": "é"}, {"role": "user", "content": "b"}]
    assert render(source, messages, add_generation_prompt=False) == '"é"'
