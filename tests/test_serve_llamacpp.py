"""The llamacpp serving backend on a tiny Llama GGUF and two tiny LoRA GGUFs, all written by our exporter.

References are llama.cpp itself: ``Llama(..., lora_path=A)`` fixes one adapter at load time, so the
backend's runtime switching must give exactly its greedy tokens; the base alone likewise. Blends
have no such reference: they must differ from each adapter alone and repeat exactly.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from engine.errors import UserError

llama_cpp = pytest.importorskip("llama_cpp")

CTX = 256
NEW = 16
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]

# A template that reaches for more than the tiny one: bos_token, a default system turn,
# raise_exception, a filter. Newlines sit after text, never right after a block tag.
RICH = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if loop.first and m['role'] != 'system' %}<|im_start|>system\nBe terse.<|im_end|>\n{% endif %}"
    "{% if m['role'] not in ['system', 'user', 'assistant'] %}{{ raise_exception('unknown role ' + m['role']) }}{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
EVIL = "{{ messages.append(1) }}"


def _sharp_tiny(hidden: int = 64):
    """The tiny Llama with peaked attention (see tests/test_export.py: layout mistakes then show)."""
    import torch

    from engine.model import TinySpec, build_tiny

    model, tokenizer = build_tiny(TinySpec(kind="tiny", hidden_size=hidden, intermediate_size=2 * hidden))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(12)
            elif name.endswith(("v_proj.weight", "o_proj.weight")):
                p.mul_(10)
    return model, tokenizer


def _lora_gguf(model, config: dict, tmp: Path, name: str, seed: int) -> Path:
    """A random (non-zero B) PEFT LoRA on every projection -> our GGUF adapter."""
    import torch
    from peft import LoraConfig, get_peft_model

    from engine.export.gguf import write_lora_gguf
    from engine.export.merge import Trained

    with torch.random.fork_rng():  # the suite's global RNG stays as it was
        torch.manual_seed(seed)
        peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False))
    peft.save_pretrained(tmp / name)
    peft.unload()  # the base module tree back, for the next adapter
    return write_lora_gguf(Trained(adapter_dir=tmp / name), config, tmp / f"{name}.gguf")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from engine.export.gguf import write_gguf

    tmp = tmp_path_factory.mktemp("llamacpp")
    model, tokenizer = _sharp_tiny()
    model.save_pretrained(tmp / "base")
    tokenizer.save_pretrained(tmp / "base")
    config = json.loads((tmp / "base" / "config.json").read_text())
    other, _ = _sharp_tiny(hidden=32)  # a LoRA of another base: same architecture, other shapes
    other_config = {**other.config.to_dict(), "architectures": ["LlamaForCausalLM"]}
    return SimpleNamespace(
        tmp=tmp,
        tokenizer=tokenizer,
        base=write_gguf(tmp / "base", tmp / "base.gguf", "f32", chat_template=tokenizer.chat_template),
        rich=write_gguf(tmp / "base", tmp / "rich.gguf", "f32", chat_template=RICH),
        evil=write_gguf(tmp / "base", tmp / "evil.gguf", "f32", chat_template=EVIL),
        a=_lora_gguf(model, config, tmp, "a", seed=1),
        b=_lora_gguf(model, config, tmp, "b", seed=2),
        other=_lora_gguf(other, other_config, tmp, "other", seed=3),
    )


def build(files, gguf: Path | None = None, context_length: int = CTX, **adapters: Path):
    from engine.serve.backends.llamacpp import LlamaCppSpec, load_llamacpp

    spec = LlamaCppSpec(kind="llamacpp", context_length=context_length, threads=1)
    return load_llamacpp(spec, gguf_path=gguf or files.base, adapter_paths=adapters)


@pytest.fixture(scope="module")
def backend(files):
    b = build(files, A=files.a, B=files.b)
    yield b
    b.close()


def request(prompt: list[int], *adapters: tuple[str, float], **kw):
    from engine.serve.backend import AdapterScale, GenerateRequest

    kw = {"max_tokens": NEW, "temperature": 0.0, **kw}
    return GenerateRequest(prompt_ids=prompt, adapters=tuple(AdapterScale(n, s) for n, s in adapters), **kw)


def run(backend, prompt, *adapters, **kw) -> tuple[list[int], str, str]:
    """(token ids, text, finish reason) of one whole generation."""
    pieces = list(backend.generate(request(prompt, *adapters, **kw)))
    assert all(p.finish_reason is None for p in pieces[:-1]) and pieces[-1].finish_reason is not None
    return [t for p in pieces for t in p.token_ids], "".join(p.text for p in pieces), pieces[-1].finish_reason


def reference(gguf: Path, prompt: list[int], lora: Path | None = None, n: int = NEW) -> list[int]:
    """Greedy tokens of llama.cpp with the adapter fixed at load time (``lora_path``)."""
    llm = llama_cpp.Llama(str(gguf), n_ctx=CTX, n_threads=1, verbose=False, lora_path=str(lora) if lora else None)
    try:
        out: list[int] = []
        for token in llm.generate(prompt, temp=0.0, top_k=0, min_p=0.0, repeat_penalty=1.0):
            if llama_cpp.llama_vocab_is_eog(llm._model.vocab, token) or len(out) == n:
                break
            out.append(token)
        return out
    finally:
        llm.close()


@pytest.fixture(scope="module")
def prompt(backend):
    return backend.render_chat(QUESTION)


@pytest.fixture(scope="module")
def refs(files, prompt):
    return {name: reference(files.base, prompt, lora) for name, lora in [("base", None), ("A", files.a), ("B", files.b)]}


# --- adapters: switching, blends, no leaks ------------------------------------------------


def test_adapter_at_runtime_equals_llama_cpp_with_the_adapter_fixed_at_load(backend, prompt, refs):
    assert refs["A"] != refs["base"] and refs["B"] != refs["base"]  # the adapters change the answer
    assert run(backend, prompt, ("A", 1.0))[0] == refs["A"]
    assert run(backend, prompt, ("B", 1.0))[0] == refs["B"]
    assert run(backend, prompt)[0] == refs["base"]


def test_zero_scale_and_the_empty_set_are_the_base(backend, prompt, refs):
    run(backend, prompt, ("A", 1.0))
    assert run(backend, prompt, ("A", 0.0))[0] == refs["base"]
    run(backend, prompt, ("B", 1.0))
    assert run(backend, prompt)[0] == refs["base"]


def test_a_blend_differs_from_each_adapter_alone_and_repeats_exactly(backend, prompt, refs):
    blend = run(backend, prompt, ("A", 0.5), ("B", 0.5))[0]
    assert blend not in (refs["A"], refs["B"], refs["base"])
    run(backend, prompt, ("A", 1.0))
    assert run(backend, prompt, ("A", 0.5), ("B", 0.5))[0] == blend
    assert run(backend, prompt, ("A", 0.5), ("B", 0.25))[0] != blend  # the scales are applied, not just the names


def test_switching_back_and_forth_never_reuses_a_prefix_computed_under_another_set(backend, prompt, refs):
    for name in ["base", "A", "base", "A", "B", "A", "base"]:
        adapters = () if name == "base" else ((name, 1.0),)
        assert run(backend, prompt, *adapters)[0] == refs[name], name


def test_without_the_cache_reset_the_switch_leaks_and_the_check_above_sees_it(files, prompt, refs):
    """The same sequence with the prefix-cache reset disabled: A's answer is then computed on the
    base's cached prompt. Proves the test above would catch a missing invalidation."""
    b = build(files, A=files.a)
    try:
        b._llm.reset = lambda: None
        assert run(b, prompt)[0] == refs["base"]
        assert run(b, prompt, ("A", 1.0))[0] != refs["A"]
    finally:
        b.close()


def test_the_cache_is_dropped_only_when_the_set_changes(files, prompt, monkeypatch):
    """Unseeded sampling with the same set again keeps llama.cpp's prefix cache (a chat's growing
    prompt is not recomputed): the prompt is evaluated whole only after a switch, else just its
    last token. A reproducible request (a seed, or temperature 0) always evaluates it whole:
    llama.cpp's logits depend on the batch, and its answer must not depend on what ran before."""
    b = build(files, A=files.a)
    try:
        evaluated: list[list[int]] = []
        evaluate = b._llm.eval
        monkeypatch.setattr(b._llm, "eval", lambda tokens: (evaluated[-1].append(len(tokens)), evaluate(tokens)))
        for adapters in [(), (), (("A", 1.0),), (("A", 1.0),), (("A", 0.0),), ()]:
            evaluated.append([])
            run(b, prompt, *adapters, max_tokens=2, temperature=0.8)
        whole = len(prompt)
        assert [e[0] for e in evaluated] == [whole, 1, whole, 1, whole, 1]  # scale 0 is the base: A -> base, then base
        for kw in ({"temperature": 0.0}, {"temperature": 0.8, "seed": 3}, {"temperature": 0.0}):
            evaluated.append([])
            run(b, prompt, max_tokens=2, **kw)
            assert evaluated[-1][0] == whole, kw
    finally:
        b.close()


def test_adapters_are_listed_with_their_format_and_unknown_ones_are_refused(backend, prompt):
    assert [(a.name, a.format) for a in backend.adapters()] == [("A", "gguf"), ("B", "gguf")]
    with pytest.raises(UserError, match=r"adapter 'C' is not loaded \(loaded: A, B\)"):
        backend.generate(request(prompt, ("C", 1.0)))
    with pytest.raises(UserError, match="named twice"):
        backend.generate(request(prompt, ("A", 1.0), ("A", 0.5)))


def test_loading_the_same_file_again_is_a_no_op_and_another_file_under_a_used_name_is_refused(backend, files):
    assert backend.load_adapter("A", files.a) == backend.adapters()[0]
    with pytest.raises(UserError, match="already loaded from another file"):
        backend.load_adapter("A", files.b)


def test_provenance_comes_from_the_run_dir_the_adapter_lies_in(files, tmp_path):
    run_dir = tmp_path / "2026-12-01_10-00-00"
    (run_dir / "export").mkdir(parents=True)
    (run_dir / "config.yaml").write_text("recipe: export_smollm2\nseed: 0\n")
    (run_dir / "export" / "adapter-lora.gguf").write_bytes(files.a.read_bytes())
    b = build(files)
    try:
        info = b.load_adapter("run", run_dir / "export" / "adapter-lora.gguf")
        assert (info.run, info.recipe) == ("2026-12-01_10-00-00", "export_smollm2")
    finally:
        b.close()


# --- chat template -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "messages",
    [
        QUESTION,
        [{"role": "system", "content": "You are a geographer."}, *QUESTION],
        [*QUESTION, {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "  And of Spain?  "}],
    ],
)
@pytest.mark.parametrize("template", ["tiny", "rich"])
def test_render_chat_gives_the_ids_of_transformers_apply_chat_template(files, messages, template):
    """Token ids, not strings (ENV-NOTES): the GGUF's embedded template, rendered and tokenized here."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(files.tmp / "base")
    if template == "rich":
        tokenizer.chat_template = RICH
    want = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]
    b = build(files, files.rich if template == "rich" else files.base)
    try:
        assert b.render_chat(messages) == want
    finally:
        b.close()


def test_template_refusals_and_sandbox_violations_are_user_errors(files):
    b = build(files, files.rich)
    try:
        with pytest.raises(UserError, match="refused these messages: unknown role tool"):
            b.render_chat([{"role": "tool", "content": "42"}])
    finally:
        b.close()
    b = build(files, files.evil)
    try:
        with pytest.raises(UserError, match="stopped by the sandbox"):
            b.render_chat(QUESTION)
    finally:
        b.close()


def test_tokenize_parses_special_tokens_and_adds_no_bos(backend, files):
    text = "<|im_start|>user\nhi<|im_end|>\n"
    assert backend.tokenize(text) == files.tokenizer(text, add_special_tokens=False).input_ids
    assert backend.tokenize("") == []


# --- generation: finish reasons, stop strings, UTF-8, early close ---------------------------


def test_max_tokens_and_the_context_end_finish_with_length(files, backend, prompt, refs):
    ids, _, finish = run(backend, prompt, max_tokens=3)
    assert (ids, finish) == (refs["base"][:3], "length")
    small = build(files, context_length=len(prompt) + 5)
    try:
        ids, _, finish = run(small, prompt, max_tokens=100)
        assert (ids, finish) == (refs["base"][:5], "length")
        with pytest.raises(UserError, match="the context holds"):
            small.generate(request(prompt + [1] * 5))
    finally:
        small.close()


def test_stop_strings_end_the_text_before_them_and_never_emit_past_them(backend, prompt):
    full_ids, full, _ = run(backend, prompt, max_tokens=NEW)
    stop = full[7:10]  # starts inside a token and ends in another, as often happens
    assert stop and full.find(stop) >= 0
    pieces = list(backend.generate(request(prompt, max_tokens=NEW, stop=("never-here", stop))))
    text = "".join(p.text for p in pieces)
    assert text == full[: full.find(stop)]
    assert pieces[-1].finish_reason == "stop"
    got = [t for p in pieces for t in p.token_ids]
    assert got == full_ids[: len(got)] and len(got) < len(full_ids)


def scripted(backend, monkeypatch, tokens: list[int]):
    """llama.cpp's token source replaced by a fixed sequence of real token ids (decoding, EOS and
    stop strings then run on known input)."""

    def generate(prompt, **kw):
        yield from tokens

    monkeypatch.setattr(backend._llm, "generate", generate)


def test_multibyte_characters_split_over_tokens_come_out_whole(files, monkeypatch):
    b = build(files)
    try:
        text = "Grüße, €uro und 日本!"
        ids = b.tokenize(text)
        assert len(ids) > len(text)  # byte-level tokens: some characters span several
        scripted(b, monkeypatch, ids)
        pieces = list(b.generate(request([1], max_tokens=100)))
        assert "".join(p.text for p in pieces) == text
        assert all("\ufffd" not in p.text for p in pieces)
        assert [t for p in pieces for t in p.token_ids] == ids
        assert pieces[-1].finish_reason == "length"
    finally:
        b.close()


def test_eos_finishes_with_stop_and_is_not_in_the_text(files, monkeypatch):
    b = build(files)
    try:
        ids = b.tokenize("Paris.")
        eos = b._llm.token_eos()
        scripted(b, monkeypatch, [*ids, eos, *b.tokenize(" More.")])
        pieces = list(b.generate(request([1], max_tokens=100)))
        assert "".join(p.text for p in pieces) == "Paris."
        assert [t for p in pieces for t in p.token_ids] == ids
        assert pieces[-1].finish_reason == "stop"
    finally:
        b.close()


def test_a_stop_string_over_multibyte_tokens_is_held_back_until_decided(files, monkeypatch):
    b = build(files)
    try:
        scripted(b, monkeypatch, b.tokenize("cost: 5€ and 6€uro"))
        pieces = list(b.generate(request([1], max_tokens=100, stop=("€uro",))))
        assert "".join(p.text for p in pieces) == "cost: 5€ and 6"
        assert pieces[-1].finish_reason == "stop"
    finally:
        b.close()


@pytest.mark.parametrize(
    ("text", "start", "stops", "want"),
    [
        ("hello wor", 0, ("world",), (6, False)),  # "wor" may become "world": held
        ("hello world", 0, ("world",), (6, True)),
        ("hello", 0, ("lo!", "o"), (4, True)),
        ("abcab", 3, ("abd",), (3, False)),  # "ab" held back
        ("abc", 0, (), (3, False)),
        ("xyz", 1, ("zq", ""), (2, False)),
    ],
)
def test_stop_cut(text, start, stops, want):
    from engine.serve.backends.llamacpp import stop_cut

    assert stop_cut(text, start, stops) == want


def test_a_generation_closed_early_stops_decoding(files, backend, prompt, refs):
    stream = backend.generate(request(prompt, max_tokens=200))
    next(stream), next(stream)
    stream.close()
    assert backend._llm.n_tokens <= len(prompt) + 2  # nothing decoded after the client went away
    assert run(backend, prompt)[0] == refs["base"]


def test_an_older_generation_still_open_stops_when_a_newer_one_starts(backend, prompt):
    old = backend.generate(request(prompt, max_tokens=50))
    next(old)
    list(backend.generate(request(prompt, max_tokens=2)))
    with pytest.raises(RuntimeError, match="another generation started"):
        list(old)


def test_seeded_sampling_repeats_and_another_seed_differs(backend, prompt):
    same = [run(backend, prompt, temperature=1.5, top_p=0.95, seed=7)[0] for _ in range(2)]
    assert same[0] == same[1]
    assert run(backend, prompt, temperature=1.5, top_p=0.95, seed=8)[0] != same[0]


# --- bad files ---------------------------------------------------------------------------


def _no_path(err: pytest.ExceptionInfo, *dirs: Path) -> str:
    message = str(err.value)
    assert all(str(d) not in message for d in dirs), message
    return message


def test_bad_adapter_files_are_user_errors_named_by_file(files, tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf at all" * 10)
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(files.a.read_bytes()[:2000])
    b = build(files)
    try:
        cases = [
            (junk, "junk.gguf is not a GGUF file"),
            (truncated, "could not apply cut.gguf"),
            (files.other, "could not apply other.gguf .*fits only the base"),
            (files.base, "general.type=model"),
            (files.tmp / "a", "is a PEFT adapter"),
            (files.tmp / "a" / "adapter_model.safetensors", "is a PEFT adapter"),
            (tmp_path / "missing.gguf", "missing.gguf does not exist"),
        ]
        for path, says in cases:
            with pytest.raises(UserError, match=says) as err:
                b.load_adapter("x", path)
            _no_path(err, tmp_path, files.tmp)
        assert b.adapters() == []
        assert len(run(b, b.render_chat(QUESTION))[0]) == NEW  # still serving
    finally:
        b.close()


def test_bad_base_files_are_user_errors_named_by_file(files, tmp_path):
    from engine.model import GgufSpec
    from engine.serve.backends.llamacpp import LlamaCppSpec, load_llamacpp

    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(files.base.read_bytes()[:5000])
    for path, says in [
        (tmp_path / "missing.gguf", "missing.gguf does not exist"),
        (truncated, "could not load cut.gguf"),
        (files.a, r"could not load a.gguf \(general.type=adapter"),
    ]:
        with pytest.raises(UserError, match=says) as err:
            build(files, path)
        _no_path(err, tmp_path, files.tmp)
    spec = LlamaCppSpec(kind="llamacpp")
    with pytest.raises(UserError, match="model=tiny ships none"):
        load_llamacpp(spec, model_spec=SimpleNamespace(kind="tiny"))
    with pytest.raises(UserError, match="not in package"):
        load_llamacpp(spec, model_spec=GgufSpec(kind="gguf", package="llama_cpp", file="nothing.gguf"))


def _finished_run(root: Path, files, *, lora: bool, export: bool) -> Path:
    """A run dir as train + export_gguf leave it: adapter/ (or model/), export/ with its manifest."""
    import shutil

    done = root / ("lora_run" if lora else "full_run")
    weights = done / ("adapter/adapter_config.json" if lora else "model/config.json")
    weights.parent.mkdir(parents=True)
    weights.write_text("{}")
    (done / "config.yaml").write_text("recipe: lora_tiny\n")
    if export:
        (done / "export").mkdir()
        shutil.copy(files.base, done / "export" / "model-f32.gguf")
        listed = {"model-f32.gguf": {"kind": "model"}}
        if lora:
            shutil.copy(files.a, done / "export" / "adapter-lora.gguf")
            listed["adapter-lora.gguf"] = {"kind": "lora", "base": {"file": "model-f32.gguf"}}
        (done / "export" / "manifest.json").write_text(json.dumps({"files": listed}))
    return done


def test_a_finished_runs_export_is_served_its_lora_active_on_the_base_it_was_exported_for(files, prompt, refs, tmp_path):
    from engine.serve.backend import AdapterScale, BackendSource
    from engine.serve.backends import open_backend
    from engine.serve.backends.llamacpp import LlamaCppSpec

    spec = LlamaCppSpec(kind="llamacpp", context_length=CTX, threads=1)
    tiny = SimpleNamespace(kind="tiny")
    for lora in (True, False):
        done = _finished_run(tmp_path, files, lora=lora, export=True)
        opened = open_backend(spec, BackendSource(model=tiny, evaluated=done, out_dir=tmp_path))
        try:
            assert opened.backend.model_id == "model-f32"  # the export's base, not the model group's
            if lora:
                assert opened.active == (AdapterScale("lora_run", 1.0),)
                assert [(a.name, a.run, a.recipe) for a in opened.backend.adapters()] == [("lora_run", "lora_run", "lora_tiny")]
                assert run(opened.backend, prompt, ("lora_run", 1.0))[0] == refs["A"]
            else:  # a full fine-tune: its model GGUF is the base, nothing to activate
                assert opened.active == () and opened.backend.adapters() == []
        finally:
            opened.backend.close()
    for lora, said in [(True, "has no export/adapter-lora.gguf and its base is not a packaged GGUF"), (False, "no GGUF export")]:
        done = _finished_run(tmp_path / "bare", files, lora=lora, export=False)
        with pytest.raises(UserError, match=said):
            open_backend(spec, BackendSource(model=tiny, evaluated=done, out_dir=tmp_path))


def test_close_frees_adapters_and_model_and_is_idempotent(files, prompt):
    b = build(files, A=files.a)
    run(b, prompt, ("A", 1.0))
    b.close()
    b.close()
    with pytest.raises(UserError, match="closed"):
        b.generate(request(prompt))


# --- through the HTTP layer ------------------------------------------------------------------


def test_the_openai_client_against_the_server_on_this_backend(files):
    """models, chat (plain, streamed, an adapter by ``model``), completions, and /lora-adapters
    blending (one adapter loaded by path) and clearing: each answer is the backend's own greedy one."""
    import http.client
    import threading
    import time

    from openai import OpenAI

    from engine.serve.adapters import AdapterDirs
    from engine.serve.app import build_app
    from engine.serve.backends.llamacpp import LlamaCppSpec, load_llamacpp
    from engine.serve.server import bind, url_of, uvicorn_server

    spec = LlamaCppSpec(kind="llamacpp", port=0, context_length=CTX, threads=1, adapter_dirs=[str(files.tmp)])
    b = load_llamacpp(spec, gguf_path=files.base, adapter_paths={"A": files.a})
    prompt = b.render_chat(QUESTION)
    want = {"base": run(b, prompt)[1], "A": run(b, prompt, ("A", 1.0))[1]}
    b.load_adapter("b", files.b)
    want["blend"] = run(b, prompt, ("b", 0.5), ("A", 0.5))[1]
    plain = files.tokenizer.decode(prompt)
    want["completion"] = run(b, b.tokenize(plain))[1]
    assert len({want["base"], want["A"], want["blend"]}) == 3

    fresh = load_llamacpp(spec, gguf_path=files.base, adapter_paths={"A": files.a})  # "b" loads over HTTP
    app = build_app(fresh, spec, adapter_dirs=AdapterDirs(spec.adapter_dirs))
    sock = bind("127.0.0.1", 0)
    server = uvicorn_server(app)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.time() + 30
        while not server.started and time.time() < deadline:
            time.sleep(0.02)
        url = url_of(sock)
        client = OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)

        def chat(model: str, **kw):
            return client.chat.completions.create(model=model, messages=QUESTION, max_tokens=NEW, temperature=0, **kw)

        def set_adapters(body) -> None:
            host, port = url.removeprefix("http://").split(":")
            conn = http.client.HTTPConnection(host, int(port), timeout=60)
            conn.request("POST", "/lora-adapters", body=json.dumps(body), headers={"Content-Type": "application/json"})
            reply = conn.getresponse()
            assert reply.status == 200, reply.read()
            conn.close()

        assert {m.id for m in client.models.list().data} == {fresh.model_id, "A"}
        assert chat(fresh.model_id).choices[0].message.content == want["base"]
        assert chat("A").choices[0].message.content == want["A"]
        streamed = "".join(c.choices[0].delta.content or "" for c in chat(fresh.model_id, stream=True) if c.choices)
        assert streamed == want["base"]
        done = client.completions.create(model=fresh.model_id, prompt=plain, max_tokens=NEW, temperature=0)
        assert done.choices[0].text == want["completion"]
        set_adapters({"adapters": [{"path": "b.gguf", "name": "b", "scale": 0.5}, {"name": "A", "scale": 0.5}]})
        assert chat(fresh.model_id).choices[0].message.content == want["blend"]
        set_adapters([])
        assert chat(fresh.model_id).choices[0].message.content == want["base"]
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
        fresh.close()
        b.close()
