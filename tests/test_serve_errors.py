"""Every bad request gets OpenAI's error shape and the right 4xx, leaks nothing, and the server goes on.

Each case asserts the status, ``{"error": {"message", "type", "param", "code"}}``, that neither
a local path (the test's tmp dir) nor a traceback is in the body, and that /health and a chat
still answer afterwards.
"""

from __future__ import annotations

import pytest
from test_serve import MESSAGES, Served, make_files, running, serve_files, start_server, wait_for

KEY = "k3y-for-the-tests-0123456789"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return make_files(tmp_path_factory.mktemp("serve_errors"))


@pytest.fixture(scope="module")
def served(files):
    yield from running(*serve_files(files, max_body_bytes=4096), files)


@pytest.fixture(scope="module")
def keyed(files, served):
    """A second app on the same backend, behind an API key (tests run one at a time)."""
    from engine.serve.adapters import AdapterDirs
    from engine.serve.app import build_app

    app = build_app(served.backend, served.state.spec, api_key=KEY, adapter_dirs=AdapterDirs([files / "adapters"]))
    url, stop = start_server(app)
    yield Served(url, app, served.backend, files)
    stop()


def assert_error(reply, status: int, *, code=None, param=None, files=None, type="invalid_request_error"):
    assert reply.status == status, reply.text
    err = reply.json["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["type"] == type
    if code is not None:
        assert err["code"] == code, err
    if param is not None:
        assert err["param"] == param, err
    assert "Traceback" not in reply.text and 'File "' not in reply.text
    if files is not None:
        assert str(files) not in reply.text and str(files.resolve()) not in reply.text
        assert "/tmp" not in reply.text, reply.text


def still_serving(served: Served) -> None:
    assert served.call("GET", "/health").status == 200
    reply = served.call("POST", "/v1/chat/completions", {"model": served.backend.model_id, "messages": MESSAGES, "max_tokens": 2})
    assert reply.status == 200, reply.text


def chat(served, **fields):
    return {"model": served.backend.model_id, "messages": MESSAGES, **fields}


BAD_BODIES = [
    # (id, body changes, status, code, param)
    ("temperature-string", {"temperature": "0.5"}, 400, "invalid_type", "temperature"),
    ("temperature-above-2", {"temperature": 2.5}, 400, "invalid_value", "temperature"),
    ("temperature-negative", {"temperature": -0.1}, 400, "invalid_value", "temperature"),
    ("top_p-zero", {"top_p": 0}, 400, "invalid_value", "top_p"),
    ("top_p-above-1", {"top_p": 1.5}, 400, "invalid_value", "top_p"),
    ("max_tokens-zero", {"max_tokens": 0}, 400, "invalid_value", "max_tokens"),
    ("max_tokens-float", {"max_tokens": 2.5}, 400, "invalid_type", "max_tokens"),
    ("max_completion_tokens-negative", {"max_completion_tokens": -3}, 400, "invalid_value", "max_completion_tokens"),
    ("n-2", {"n": 2}, 400, "invalid_value", "n"),
    ("stream-string", {"stream": "yes"}, 400, "invalid_type", "stream"),
    ("seed-string", {"seed": "7"}, 400, "invalid_type", "seed"),
    ("stop-five", {"stop": ["a", "b", "c", "d", "e"]}, 400, "invalid_value", "stop"),
    ("messages-missing", {"messages": None}, 400, None, "messages"),
    ("messages-empty", {"messages": []}, 400, "invalid_value", "messages"),
    ("content-number", {"messages": [{"role": "user", "content": 5}]}, 400, "invalid_type", "messages[0].content"),
    ("role-unknown", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "invalid_type", "messages[0].role"),
    ("model-missing", {"model": None}, 400, None, "model"),
]


@pytest.mark.parametrize("case", BAD_BODIES, ids=[c[0] for c in BAD_BODIES])
def test_wrong_types_and_ranges_are_400_naming_the_parameter(served, files, case):
    _, change, status, code, param = case
    body = {k: v for k, v in chat(served, **change).items() if v is not None}
    assert_error(served.call("POST", "/v1/chat/completions", body), status, code=code, param=param, files=files)
    still_serving(served)


def test_unknown_fields_are_ignored_as_openai_does(served):
    reply = served.call("POST", "/v1/chat/completions", chat(served, max_tokens=2, frequency_penalty=0.1, user="me", tools=None))
    assert reply.status == 200, reply.text


def test_malformed_json_is_400(served, files):
    for raw in (b'{"model": "x", "messages": [', b"\xff\xfe", b"[1, 2]", b"null"):
        assert_error(served.call("POST", "/v1/chat/completions", raw=raw), 400, files=files)
    assert served.call("POST", "/v1/chat/completions", raw=b"{bad").json["error"]["code"] == "invalid_json"
    still_serving(served)


def test_unknown_model_is_404(served, files):
    reply = served.call("POST", "/v1/chat/completions", chat(served, model="gpt-4o"))
    assert_error(reply, 404, code="model_not_found", param="model", files=files)
    assert_error(served.call("POST", "/v1/completions", {"model": "nope", "prompt": "x"}), 404, code="model_not_found")
    assert_error(served.call("GET", "/v1/models/nope"), 404, code="model_not_found")
    still_serving(served)


def test_oversize_prompt_is_context_length_exceeded(served, files):
    long = [{"role": "user", "content": "river " * 400}]
    assert_error(
        served.call("POST", "/v1/chat/completions", chat(served, messages=long)),
        400,
        code="context_length_exceeded",
        param="messages",
        files=files,
    )
    # A prompt that fits, with a completion that would not.
    assert_error(served.call("POST", "/v1/chat/completions", chat(served, max_tokens=1000)), 400, code="context_length_exceeded")
    assert_error(
        served.call("POST", "/v1/completions", {"model": served.backend.model_id, "prompt": "river " * 400}),
        400,
        code="context_length_exceeded",
        param="prompt",
    )
    still_serving(served)


def test_body_too_large_is_413(served, files):
    big = chat(served, messages=[{"role": "user", "content": "x" * 10_000}])
    assert_error(served.call("POST", "/v1/chat/completions", big), 413, code="request_too_large", files=files)
    still_serving(served)


def test_unknown_route_and_method_keep_the_shape(served, files):
    assert_error(served.call("GET", "/v1/nothing"), 404, code="unknown_url", files=files)
    assert_error(served.call("DELETE", "/v1/chat/completions"), 405, code="method_not_allowed", files=files)
    still_serving(served)


def test_missing_or_wrong_key_is_401_and_health_needs_none(keyed, files):
    body = chat(keyed, max_tokens=2)
    assert_error(keyed.call("POST", "/v1/chat/completions", body), 401, code="missing_api_key", files=files)
    for header in (f"Bearer {KEY}x", "Bearer ", f"Basic {KEY}", KEY):
        reply = keyed.call("POST", "/v1/chat/completions", body, headers={"Authorization": header})
        assert_error(reply, 401, code="invalid_api_key", files=files)
    assert_error(keyed.call("GET", "/v1/models"), 401)
    assert_error(keyed.call("GET", "/lora-adapters"), 401)
    assert_error(keyed.call("POST", "/lora-adapters", []), 401)
    assert keyed.call("GET", "/health").status == 200
    ok = keyed.call("POST", "/v1/chat/completions", body, headers={"Authorization": f"Bearer {KEY}"})
    assert ok.status == 200, ok.text
    import openai

    with pytest.raises(openai.AuthenticationError):
        keyed.client("wrong").models.list()
    assert keyed.client(KEY).models.list().data


ADAPTER_PATHS = [
    ("traversal", "../base", 400, "adapter_path_not_allowed"),
    ("traversal-inside", "b/../../outside/evil", 400, "adapter_path_not_allowed"),
    ("absolute-outside", "{root}/outside/evil", 400, "adapter_path_not_allowed"),
    ("absolute-base", "{root}/base", 400, "adapter_path_not_allowed"),
    ("symlink-out", "link", 400, "adapter_path_not_allowed"),
    ("text-file", "notes.txt", 400, "not_an_adapter"),
    ("fake-gguf", "fake.gguf", 400, "not_an_adapter"),
    ("bin-weights", "bin_only", 400, "not_an_adapter"),
    ("gguf-on-hf", "real.gguf", 400, "invalid_adapter"),
    ("missing", "nothing/here", 404, "adapter_not_found"),
]


@pytest.mark.parametrize("case", ADAPTER_PATHS, ids=[c[0] for c in ADAPTER_PATHS])
def test_adapter_paths_outside_the_fence_or_not_adapters_are_refused(served, files, case):
    _, path, status, code = case
    before = served.call("GET", "/lora-adapters").json
    reply = served.call("POST", "/lora-adapters", {"adapters": [{"path": path.format(root=files), "scale": 1.0}]})
    assert_error(reply, status, code=code, files=files)
    assert served.call("GET", "/lora-adapters").json == before  # nothing loaded, nothing switched
    still_serving(served)


def test_bad_adapter_sets_are_refused(served, files):
    cases = [
        ({"adapters": [{"name": "nope"}]}, 404, "adapter_not_found"),
        ([{"id": 99, "scale": 1.0}], 404, "adapter_not_found"),
        ({"adapters": [{"scale": 1.0}]}, 400, None),
        ({"adapters": [{"name": "a", "scale": "big"}]}, 400, "invalid_type"),
        ({"adapters": [{"name": "a"}, {"name": "a"}]}, 400, None),
        ({"wrong": []}, 400, "missing_required_parameter"),
    ]
    for body, status, code in cases:
        assert_error(served.call("POST", "/lora-adapters", body), status, code=code, files=files)
    still_serving(served)


def test_an_unexpected_backend_error_is_a_generic_500_and_the_server_goes_on(served, files, monkeypatch):
    def broken():
        raise RuntimeError(f"kaboom in {files}/secret/model.bin")

    monkeypatch.setattr(served.backend.batch, "step", broken)
    reply = served.call("POST", "/v1/chat/completions", chat(served, max_tokens=2))
    assert_error(reply, 500, code="internal_error", type="server_error", files=files)
    assert "kaboom" not in reply.text
    streamed = served.call("POST", "/v1/chat/completions", chat(served, max_tokens=2, stream=True))
    assert_error(streamed, 500, type="server_error", files=files)
    monkeypatch.undo()
    still_serving(served)
    wait_for(lambda: served.state.gate.inside == 0, timeout=5)
