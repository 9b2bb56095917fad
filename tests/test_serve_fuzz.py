"""Property-based fuzz of the HTTP API (issue 29): whatever a client sends, no 5xx.

Hypothesis draws request bodies shaped like OpenAI's (chat, completions, /lora-adapters, a
model by id) whose every field may instead hold something hostile: lone surrogates, special
tokens, template syntax, paths, huge or tiny or non-finite numbers, nested junk, wrong types,
raw bytes, deep nesting. Each example is one HTTP request to a real server, on ``serve=hf``
(tiny random Llama) and on ``serve=llamacpp`` (the shipped SmolLM2 Q4_1 GGUF). Asserted for
every response: no 5xx; an error has OpenAI's shape and no local path or traceback; a stream's
events are JSON. Afterwards /health and a chat answer and the queue is empty.

Bounded and repeatable: ``derandomize=True`` (the same examples every run, no example
database), ``EXAMPLES`` per backend in the full run, marked slow (``ENGINE_FUZZ_EXAMPLES`` raises
it for a longer run: bench/RESULTS.md "Server under hostile input"); the default suite sends
``QUICK`` per backend through the same property.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from urllib.parse import quote

import pytest
from test_serve import wait_for
from test_serve_errors import still_serving
from test_serve_hostile import hf, llamacpp, served  # noqa: F401  (the two servers)

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

EXAMPLES = int(os.environ.get("ENGINE_FUZZ_EXAMPLES", "150"))
QUICK = 25
SEEN: dict[str, Counter] = {}
"""Status codes per backend over the run (printed at the end of each test: ``pytest -s``)."""

# --- strategies ------------------------------------------------------------------------------------

HOSTILE_TEXT = [
    "\ud800",
    "a\udfffb",
    "\x00",
    "<|im_start|>",
    "<|im_end|>\n<|im_start|>system\n",
    "<|endoftext|>",
    "{{ 7*7 }}{% for x in range(99999999) %}x{% endfor %}",
    "../../etc/passwd",
    "/tmp/secret/model.gguf",
    "\u202e\ufeff\u200b",
    "\U0001f600" * 30,
    "é" * 200,
    " " * 500,
    "x" * 3000,
]
text = st.one_of(
    st.text(max_size=20),
    st.text(max_size=20),
    st.text(st.characters(exclude_categories=()), max_size=20),  # any code point, lone surrogates too
    st.sampled_from(HOSTILE_TEXT),
    st.lists(st.sampled_from(HOSTILE_TEXT), min_size=2, max_size=4).map("".join),
)
number = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, 1, 2, -1, 0.0, -0.0, 1e-300, 5e-324, 2**31, 2**63, 2**64, 0xFFFFFFFF, 1e30, 1e308]),
)
scalar = st.one_of(st.none(), st.booleans(), number, text)
junk = st.recursive(scalar, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3), max_leaves=6)


def field(valid):
    """Mostly a plausible value, sometimes anything."""
    return st.one_of(valid, valid, junk)


message = st.fixed_dictionaries(
    {
        "role": field(st.sampled_from(["system", "developer", "user", "assistant"])),
        "content": field(st.one_of(text, st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": text}), max_size=3))),
    },
    optional={"name": junk},
)
sampling = {
    "max_tokens": field(st.integers(1, 4)),
    "temperature": field(st.one_of(st.floats(0, 2), st.sampled_from([0, 1e-300, 5e-324, 2]))),
    "top_p": field(st.one_of(st.floats(0, 1, exclude_min=True), st.sampled_from([1e-300, 5e-324, 1]))),
    "seed": field(st.one_of(st.integers(-(2**63), 2**63 - 1), st.sampled_from([-1, 0, 0xFFFFFFFF, 2**64]))),
    "stop": field(st.one_of(text, st.lists(text, max_size=5))),
    "n": field(st.just(1)),
    "stream": field(st.booleans()),
    "stream_options": field(st.fixed_dictionaries({"include_usage": st.booleans()})),
    "user": junk,
    "tools": junk,
}
MODEL = "<the base>"  # replaced by the server's model id when sent
model = st.one_of(st.just(MODEL), st.just(MODEL), st.just("a"), text, junk)
chat_body = st.fixed_dictionaries(
    {"model": model, "messages": field(st.lists(message, min_size=1, max_size=4))},
    optional={**sampling, "max_completion_tokens": field(st.integers(1, 4))},
)
completion_body = st.fixed_dictionaries(
    {
        "model": model,
        "prompt": field(st.one_of(text, st.lists(text, max_size=2), st.lists(st.integers(-3, 60_000), min_size=1, max_size=6))),
    },
    optional=sampling,
)
# Bodies a client could mean: every field well-typed and in range, text as hostile as above.
well_typed = {
    "max_tokens": st.integers(1, 4),
    "temperature": st.one_of(st.floats(0, 2), st.sampled_from([0, 1e-300, 5e-324, 2])),
    "top_p": st.one_of(st.floats(0, 1, exclude_min=True), st.sampled_from([1e-300, 5e-324, 1])),
    "seed": st.one_of(st.integers(-(2**63), 2**63 - 1), st.sampled_from([-1, 0, 0xFFFFFFFF])),
    "stop": st.one_of(text, st.lists(text, max_size=4)),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
}
typed_message = st.fixed_dictionaries({"role": st.sampled_from(["system", "developer", "user", "assistant"]), "content": text})
well_typed_chat = st.fixed_dictionaries(
    {"model": st.just(MODEL), "messages": st.lists(typed_message, min_size=1, max_size=4)}, optional=well_typed
)
well_typed_completion = st.fixed_dictionaries(
    {"model": st.just(MODEL), "prompt": st.one_of(text, st.lists(st.integers(0, 49_151), min_size=1, max_size=6))},
    optional=well_typed,
)
adapter_item = st.fixed_dictionaries(
    {}, optional={"id": field(st.integers(-1, 3)), "name": field(st.sampled_from(["a", "b"])), "path": text, "scale": number}
)
adapters_body = st.one_of(
    st.fixed_dictionaries({"adapters": st.lists(adapter_item, max_size=3)}), st.lists(adapter_item, max_size=3), junk
)
raw_body = st.one_of(
    st.binary(max_size=64),
    st.integers(30, 3000).map(lambda d: ("[" * d + "]" * d).encode()),
    st.integers(30, 3000).map(lambda d: ('{"a":' * d + "1" + "}" * d).encode()),
)
request = st.one_of(
    st.tuples(st.just("POST"), st.just("/v1/chat/completions"), well_typed_chat),
    st.tuples(st.just("POST"), st.just("/v1/completions"), well_typed_completion),
    st.tuples(st.just("POST"), st.just("/v1/chat/completions"), chat_body),
    st.tuples(st.just("POST"), st.just("/v1/completions"), completion_body),
    st.tuples(st.just("POST"), st.just("/lora-adapters"), adapters_body),
    st.tuples(st.just("GET"), text.map(lambda t: "/v1/models/" + quote(t.encode("utf-8", "surrogatepass"), safe="")), st.none()),
    st.tuples(st.just("POST"), st.sampled_from(["/v1/chat/completions", "/v1/completions", "/lora-adapters"]), raw_body),
)


def with_model(value, model_id: str):
    if isinstance(value, dict):
        return {k: with_model(v, model_id) for k, v in value.items()}
    if isinstance(value, list):
        return [with_model(v, model_id) for v in value]
    return model_id if value == MODEL else value


# --- the property ----------------------------------------------------------------------------------


def check(server, status: int, text_: str) -> None:
    assert status < 500, text_[:2000]
    if status >= 400:
        error(server, json.loads(text_))
    elif text_.startswith("data: "):
        for event in filter(None, text_.split("\n\n")):
            assert event.startswith("data: "), event
            if event != "data: [DONE]" and "error" in (parsed := json.loads(event[6:])):
                error(server, parsed)  # an error after the headers went out: in the stream, as OpenAI does
    else:
        json.loads(text_)  # an answer (its text may echo the prompt, paths included: the client's own)


def error(server, body: dict) -> None:
    """OpenAI's shape, a client error, nothing of the server's files or code."""
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str) and err["message"]
    assert err["type"] != "server_error", err
    shown = json.dumps(body, ensure_ascii=False)
    for leak in ("Traceback", 'File "', str(server.root), "/tmp/", "site-packages"):
        assert leak not in shown, (leak, shown[:2000])


def send_and_check(server, case) -> None:
    """The property: one request from the strategy above, its reply checked."""
    method, path, body = case
    if isinstance(body, bytes):
        reply = server.call(method, path, raw=body)
    else:
        data = json.dumps(with_model(body, server.backend.model_id)).encode() if body is not None else None
        reply = server.call(method, path, raw=data)
    SEEN.setdefault(server.backend.model_id, Counter())[reply.status] += 1
    check(server, reply.status, reply.text)


FUZZ = {
    "deadline": None,
    "derandomize": True,
    "database": None,
    "suppress_health_check": [HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
}


@pytest.mark.slow  # 150 requests per backend (22 s on llamacpp); test_a_quick_fuzz_gets_no_5xx fuzzes in the default suite
@settings(max_examples=EXAMPLES, **FUZZ)
@given(case=request)
def test_no_request_gets_a_5xx(served, case):  # noqa: F811  (served: the fixture imported above)
    send_and_check(served, case)


@settings(max_examples=QUICK, **FUZZ)
@given(case=request)
def test_a_quick_fuzz_gets_no_5xx(served, case):  # noqa: F811  (served: the fixture imported above)
    send_and_check(served, case)


@pytest.fixture(autouse=True)
def afterwards(served):  # noqa: F811  (the fixture imported above)
    """After the fuzz: the server still answers, nothing is left in the queue, the base set is back."""
    yield
    wait_for(lambda: served.state.gate.inside == 0, timeout=30)
    still_serving(served)
    served.state.active = ()
    seen = SEEN.get(served.backend.model_id, Counter())
    print(f"\nfuzz {served.backend.model_id}: {sum(seen.values())} requests, statuses {dict(sorted(seen.items()))}")
