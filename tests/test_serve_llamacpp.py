"""The llamacpp serving backend on a tiny Llama GGUF and two tiny LoRA GGUFs, all written by our exporter.

References are llama.cpp itself: ``Llama(..., lora_path=A)`` fixes one adapter at load time, so the
backend's runtime switching must give exactly its greedy tokens; the base alone likewise, and
seeded sampling must draw what ``Llama.generate`` draws with that seed. Blends have no such
reference: they must differ from each adapter alone and repeat exactly. Batching (several
requests per context, a context per adapter set: engine/serve/backends/llamacpp_batch.py): each
request in a batch gets exactly its answer alone.
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


def build(
    files,
    gguf: Path | None = None,
    context_length: int = CTX,
    max_batch: int = 2,
    prefill_chunk: int = 256,
    threads: int = 1,
    **adapters: Path,
):
    from engine.serve.backends.llamacpp import LlamaCppSpec, load_llamacpp

    spec = LlamaCppSpec(
        kind="llamacpp", context_length=context_length, threads=threads, max_batch=max_batch, prefill_chunk=prefill_chunk
    )
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


def reference(gguf: Path, prompt: list[int], lora: Path | None = None, n: int = NEW, **sampling) -> list[int]:
    """Tokens of llama.cpp's own ``Llama.generate`` with the adapter fixed at load time (``lora_path``):
    greedy, or with ``temp``, ``top_p`` and ``seed`` (top-k, min-p and penalties off, as served)."""
    seed = sampling.pop("seed", llama_cpp.LLAMA_DEFAULT_SEED)
    llm = llama_cpp.Llama(str(gguf), n_ctx=CTX, n_threads=1, verbose=False, lora_path=str(lora) if lora else None, seed=seed)
    try:
        out: list[int] = []
        for token in llm.generate(prompt, **{"temp": 0.0, "top_k": 0, "min_p": 0.0, "repeat_penalty": 1.0, **sampling}):
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


def test_every_request_reads_its_whole_prompt_into_a_kv_sequence_freed_when_it_ends(files, prompt, refs):
    """What replaced the serial backend's prefix cache (and its reset on an adapter switch): a
    request's keys and values live in its own KV sequence, filled from its whole prompt under its
    own set and removed when it ends, so nothing computed for one request reaches another."""
    b = build(files, A=files.a)
    try:
        for adapters, want in [((), "base"), ((("A", 1.0),), "A"), ((), "base")]:
            decodes = b.batch.decodes
            assert run(b, prompt, *adapters, max_tokens=3)[0] == refs[want][:3]
            assert b.batch.decodes - decodes == 3  # the whole prompt in one decode, then 2 tokens: no reuse
            assert b.batch.live() == [] and b.batch.held() == 0
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
    """The batch's sampler replaced by a fixed sequence of real token ids (llama.cpp still decodes;
    text decoding, EOS and stop strings then run on known input)."""
    source = iter(tokens)
    monkeypatch.setattr(backend.batch, "_sample", lambda seq, index: next(source))


def test_multibyte_characters_split_over_tokens_come_out_whole(files, monkeypatch):
    b = build(files)
    try:
        text = "Grüße, €uro und 日本!"
        ids = b.tokenize(text)
        assert len(ids) > len(text)  # byte-level tokens: some characters span several
        scripted(b, monkeypatch, ids)
        pieces = list(b.generate(request([1], max_tokens=len(ids))))
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
    from engine.serve.backends.llamacpp_batch import stop_cut

    assert stop_cut(text, start, stops) == want


def test_a_generation_closed_early_stops_decoding(files, backend, prompt, refs):
    decodes = backend.batch.decodes
    stream = backend.generate(request(prompt, max_tokens=200))
    next(stream), next(stream)
    stream.close()
    assert backend.batch.decodes - decodes == 2  # the prompt, then one token; nothing after the client went away
    assert backend.batch.live() == []
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


@pytest.mark.parametrize("seed", [7, 2**40 + 3, -5])
def test_seeded_sampling_draws_what_llama_cpp_draws_with_that_seed(files, backend, prompt, seed):
    """The batch's own sampler chain is today's (``Llama.generate``'s): top_p, temperature, then a
    draw seeded with the int64 seed folded to 32 bits."""
    folded = seed % 0xFFFFFFFF
    want = reference(files.base, prompt, temp=1.5, top_p=0.9, seed=folded)
    assert run(backend, prompt, temperature=1.5, top_p=0.9, seed=seed)[0] == want


# --- batching: each request's answer alone, in company --------------------------------------


def _mix(backend, prompt: list[int], tokenizer) -> dict[str, object]:
    """Requests that differ in every way a batch must keep apart: prompt length, stop strings,
    greedy and seeded sampling, budgets, and adapter sets (base, A, B, a blend)."""
    longer = (
        prompt[:-5]
        + tokenizer("Tell me more about the rivers of France, please.", add_special_tokens=False).input_ids
        + prompt[-5:]
    )
    return {
        "base": request(prompt),
        "A": request(prompt, ("A", 1.0), max_tokens=12),
        "B-long": request(longer, ("B", 1.0)),
        "blend": request(prompt, ("A", 0.5), ("B", 0.5), max_tokens=20),
        "seeded": request(longer, temperature=1.5, top_p=0.9, seed=11),
        "A-seeded": request(prompt, ("A", 1.0), temperature=0.8, seed=3, max_tokens=10),
        "short": request(prompt[-3:], max_tokens=5),
        "stop": request(prompt, ("B", 1.0), stop=("never", run(backend, prompt, ("B", 1.0))[1][6:9])),
    }


def _alone(backend, requests: dict) -> dict[str, tuple[list[int], str, str]]:
    out = {}
    for key, req in requests.items():
        pieces = list(backend.generate(req))
        out[key] = ([t for p in pieces for t in p.token_ids], "".join(p.text for p in pieces), pieces[-1].finish_reason)
    return out


def drive(batch, arrivals: dict[int, dict], drops: dict[int, list[str]] | None = None, on_step=None):
    """Run a batch: ``arrivals[n]`` (key -> request) join before step n, ``drops[n]`` leave before it.
    Returns key -> (ids, text, finish reason or None if dropped); ``on_step(n, out, slots)`` sees each step."""
    slots, pieces, n = {}, {}, 0
    while n <= max(arrivals) or batch.live():
        for key, req in arrivals.get(n, {}).items():
            slots[key], pieces[key] = batch.add(req), []
        for key in (drops or {}).get(n, []):
            batch.drop(slots[key])
        out = batch.step()
        for key, slot in slots.items():
            if slot in out:
                assert not isinstance(out[slot], BaseException), (key, out[slot])
                pieces[key].append(out[slot])
        if on_step:
            on_step(n, out, slots)
        n += 1
    return {
        key: ([t for p in ps for t in p.token_ids], "".join(p.text for p in ps), ps[-1].finish_reason if ps else None)
        for key, ps in pieces.items()
    }


@pytest.fixture(scope="module")
def wide(files):
    b = build(files, max_batch=8, A=files.a, B=files.b)
    yield b
    b.close()


def test_a_batch_of_different_requests_gives_each_its_answer_alone(wide, prompt, files):
    requests = _mix(wide, prompt, files.tokenizer)
    alone = _alone(wide, requests)
    assert alone["A"][0] != alone["base"][0][:12] and alone["blend"][0] != alone["base"][0][:20]
    assert alone["stop"][2] == "stop" and alone["short"][2] == "length"
    start, decodes = wide.batch.decodes, []
    together = drive(wide.batch, {0: requests}, on_step=lambda n, out, slots: decodes.append(wide.batch.decodes))
    assert together == alone
    # Sequences sharing a set decode together: the first step (every prompt read) is one decode per
    # set present (base, A, B, the blend), not one per request.
    assert decodes[0] - start == 4


def test_a_request_joining_mid_batch_and_one_dropped_mid_batch_do_not_change_the_others(wide, prompt, files):
    requests = _mix(wide, prompt, files.tokenizer)
    alone = _alone(wide, requests)
    first = {k: requests[k] for k in ("base", "A", "seeded", "blend")}
    later = {k: requests[k] for k in ("B-long", "A-seeded")}
    got = drive(wide.batch, {0: first, 4: later}, drops={3: ["blend"]})
    for key in ("base", "A", "seeded", "B-long", "A-seeded"):
        assert got[key] == alone[key], key
    ids, text, finish = got["blend"]
    assert finish is None and ids == alone["blend"][0][: len(ids)] and 0 < len(ids) < len(alone["blend"][0])
    assert wide.batch.live() == []


def test_a_long_prompt_is_read_in_chunks_while_the_others_keep_decoding(files, prompt):
    chunk = 8
    b = build(files, max_batch=4, prefill_chunk=chunk, A=files.a)
    try:
        long_prompt = (
            prompt[:-5]
            + files.tokenizer(" ".join(["the rivers of France"] * 12), add_special_tokens=False).input_ids
            + prompt[-5:]
        )
        requests = {"long": request(long_prompt, max_tokens=4), "short": request(prompt, ("A", 1.0), max_tokens=40)}
        alone = _alone(b, requests)
        first_piece, short_pieces = {}, []

        def watch(n, out, slots):
            if "long" in slots and slots["long"] in out:
                first_piece.setdefault("long", n)
            if "short" in slots and slots["short"] in out:
                short_pieces.append(n)

        join = -(-len(prompt) // chunk) + 2  # the short one has read its prompt and decodes
        got = drive(b.batch, {0: {"short": requests["short"]}, join: {"long": requests["long"]}}, on_step=watch)
        assert got == alone
        reading = -(-len(long_prompt) // chunk)  # steps the long prompt takes
        assert reading >= 10
        assert first_piece["long"] == join + reading - 1  # its first token comes with its last chunk
        assert all(n in short_pieces for n in range(join, join + reading))  # the other decoded every step meanwhile
    finally:
        b.close()


def _switches(monkeypatch) -> list[int]:
    """Counts llama_set_adapters_lora calls that put a set on a context (not the one at close)."""
    calls, real = [], llama_cpp.llama_set_adapters_lora

    def counted(ctx, adapters, n, scales):
        if adapters is not None:
            calls.append(n)
        return real(ctx, adapters, n, scales)

    monkeypatch.setattr(llama_cpp, "llama_set_adapters_lora", counted)
    return calls


def test_each_adapter_set_decodes_in_a_context_of_its_own_with_no_switch_per_step(files, prompt, monkeypatch):
    """The base and three sets (A, B, a blend), two requests each: every set gets a context whose
    set is put on once, every answer is its answer alone, and the side contexts are freed once
    nothing runs (at rest the batch holds the home context alone, as before)."""
    b = build(files, max_batch=8, A=files.a, B=files.b)
    try:
        sets = {"base": (), "A": (("A", 1.0),), "B": (("B", 1.0),), "blend": (("A", 0.5), ("B", 0.5))}
        requests = {f"{name}{k}": request(prompt, *s, max_tokens=12 + k) for name, s in sets.items() for k in range(2)}
        alone = _alone(b, requests)
        switches, seen = _switches(monkeypatch), []
        got = drive(b.batch, {0: requests}, on_step=lambda n, out, slots: seen.append((len(switches), b.batch.contexts())))
        assert got == alone
        # The blend, last alone, is still on the home context and keeps it; each other set gets a side sized for its 2.
        assert seen[0][1] == [(sets["blend"], 2, 8), *((s, 2, 2) for s in list(sets.values())[:3])]
        # A and B are put on their sides at the first step and never again (a new context starts on the base).
        assert [n for n, _ in seen] == [2] * len(seen)
        assert b.batch.contexts() == [(sets["blend"], 0, 8)] and b.batch.held() == 0
    finally:
        b.close()


def test_even_halves_of_the_contexts_decode_side_by_side_with_the_same_answers(files, prompt, monkeypatch):
    """With 2 threads, 4 sets of 2 sequences split into two even halves decoded in two threads on
    one thread each; 6 sequences beside 2 do not (the heavier half would take longer than both
    one after another). Either way every answer is its answer alone, computed on 2 threads."""
    b = build(files, max_batch=8, threads=2, A=files.a, B=files.b)
    try:
        sets = {"base": (), "A": (("A", 1.0),), "B": (("B", 1.0),), "blend": (("A", 0.5), ("B", 0.5))}
        even = {f"{name}{k}": request(prompt, *s, max_tokens=10 + k) for name, s in sets.items() for k in range(2)}
        uneven = {f"base{k}": request(prompt, max_tokens=10 + k) for k in range(6)}
        uneven |= {f"A{k}": request(prompt, ("A", 1.0), max_tokens=10 + k) for k in range(2)}
        sides, real = [], b.batch._side_by_side
        monkeypatch.setattr(
            b.batch, "_side_by_side", lambda halves: sides.append(len(halves[0]) + len(halves[1])) or real(halves)
        )
        for requests, went in [(even, True), (uneven, False)]:
            alone = _alone(b, requests)
            sides.clear()
            assert drive(b.batch, {0: requests}) == alone
            assert bool(sides) == went and all(n == 4 for n in sides)
    finally:
        b.close()


def test_a_side_context_is_reused_by_the_next_set_and_sets_take_turns_at_home_when_seats_run_out(files, prompt):
    """max_batch=4: the home context (4) and sides of at most 4 seats in all. A set that leaves
    hands its side to the next set (no new context); once the sides' seats are taken, a newcomer
    joins the home context beside another set and they take turns there. Every answer is still
    its answer alone."""
    b = build(files, max_batch=4, A=files.a, B=files.b)
    try:
        a, blend = (("A", 1.0),), (("A", 0.5), ("B", 0.5))
        requests = {
            "A": request(prompt, *a, max_tokens=3),  # ends at step 2
            "B": request(prompt, ("B", 1.0)),
            "blend": request(prompt, *blend),
            "A again": request(prompt, *a, max_tokens=5),
            "base": request(prompt, max_tokens=30),  # last alone: the base is on the home context
        }
        alone = _alone(b, requests)
        layouts = []
        arrivals = {0: {k: requests[k] for k in ("base", "A")}, 5: {"B": requests["B"]}, 6: {"blend": requests["blend"]}}
        arrivals[7] = {"A again": requests["A again"]}
        got = drive(b.batch, arrivals, on_step=lambda n, out, slots: layouts.append(b.batch.contexts()))
        assert got == alone
        assert layouts[0] == [((), 1, 4), (a, 1, 2)]
        assert layouts[5] == [((), 1, 4), ((("B", 1.0),), 1, 2)]  # A's side, idle since step 2, now B's
        assert layouts[6] == [((), 1, 4), ((("B", 1.0),), 1, 2), (blend, 1, 2)]
        assert layouts[7] == [(a, 2, 4), ((("B", 1.0),), 1, 2), (blend, 1, 2)]  # home: base and A in turns
        assert b.batch.contexts() == [((), 0, 4)] and b.batch.held() == 0  # the base decoded last, alone
    finally:
        b.close()


def test_an_adapter_loaded_between_steps_serves_the_next_request_and_leaves_running_ones_alone(files, prompt):
    b = build(files, max_batch=4, A=files.a)
    try:
        solo = {"base": run(b, prompt), "A": run(b, prompt, ("A", 1.0))}
        base, a = b.batch.add(request(prompt)), b.batch.add(request(prompt, ("A", 1.0)))
        pieces = {base: [], a: []}
        for _ in range(3):
            for slot, piece in b.batch.step().items():
                pieces[slot].append(piece)
        b.load_adapter("B", files.b)
        late = b.batch.add(request(prompt, ("B", 1.0)))
        pieces[late] = []
        while b.batch.live():
            for slot, piece in b.batch.step().items():
                pieces[slot].append(piece)
        ids = {slot: [t for p in ps for t in p.token_ids] for slot, ps in pieces.items()}
        assert ids[base] == solo["base"][0] and ids[a] == solo["A"][0]
        assert ids[late] == reference(files.base, prompt, files.b)
    finally:
        b.close()


def test_non_finite_scores_end_that_request_alone(files, prompt):
    """An adapter scaled far past sense overflows the model: that slot gets a UserError, the others go on."""
    b = build(files, max_batch=2, A=files.a)
    try:
        solo = run(b, prompt)
        ok, bad = b.batch.add(request(prompt)), b.batch.add(request(prompt, ("A", 1e30)))
        outs = {ok: [], bad: []}
        while b.batch.live():
            for slot, out in b.batch.step().items():
                outs[slot].append(out)
        assert len(outs[bad]) == 1 and isinstance(outs[bad][0], UserError) and "not finite" in str(outs[bad][0])
        assert [t for p in outs[ok] for t in p.token_ids] == solo[0]
    finally:
        b.close()


def test_bad_requests_are_refused_by_add_with_the_batch_untouched(wide, prompt):
    from engine.serve.backend import GenerateRequest

    cases = [
        (request(prompt, ("C", 1.0)), "adapter 'C' is not loaded"),
        (request(prompt + [1] * CTX), "the context holds 256"),
        (request([*prompt, 10**6]), "outside this model's vocabulary"),
        (GenerateRequest(prompt_ids=[], max_tokens=4), "prompt is empty"),
    ]
    for req, says in cases:
        with pytest.raises(UserError, match=says):
            wide.batch.add(req)
    assert wide.batch.live() == []


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


def test_closing_with_sequences_still_running_frees_them_and_their_readers_hear_of_it(files, prompt):
    b = build(files, A=files.a)
    stream = b.generate(request(prompt, ("A", 1.0), max_tokens=50))
    next(stream)
    b.batch.add(request(prompt))
    b.batch.step()
    b.close()  # samplers, context (holding A), adapter, model: in that order, no use-after-free
    with pytest.raises(UserError, match="closed"):
        next(stream)
    b.batch.drop(0)  # a no-op once closed


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
