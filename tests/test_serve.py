"""The OpenAI-compatible server on the hf backend: the official client, adapters, queue, the stage.

One real uvicorn server per module (a thread, a free port) over a tiny random-init Llama and
two random LoRA adapters with non-zero B, so every adapter visibly changes the greedy output.
Expected texts come from the same backend called directly (greedy), so a test compares what
the HTTP layer streams with what the model makes for that adapter set.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import ROOT, compose, save_adapter

from engine.errors import ConfigError

MESSAGES = [{"role": "user", "content": "Why do rivers meander?"}]
# --- fixtures: files, a running server ------------------------------------------------------


def make_files(root: Path) -> Path:
    """base/ (a tiny HF model dir), adapters/ (the allowed dir) and things outside or not adapters."""
    from engine.model import TinySpec, build_tiny

    model, tokenizer = build_tiny(TinySpec(kind="tiny"))
    model.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    adapters = root / "adapters"
    run = adapters / "runs" / "r1"
    save_adapter(run / "adapter", seed=1)
    (run / "config.yaml").write_text("recipe: lora_tiny\nstages: [train]\n")
    save_adapter(adapters / "b", seed=2)
    save_adapter(root / "outside" / "evil", seed=3)
    (adapters / "link").symlink_to(root / "outside" / "evil", target_is_directory=True)
    (adapters / "notes.txt").write_text("not an adapter")
    (adapters / "fake.gguf").write_bytes(b"definitely not gguf")
    (adapters / "real.gguf").write_bytes(b"GGUF" + bytes(60))  # a GGUF header: the hf backend cannot use it
    (adapters / "bin_only").mkdir()
    (adapters / "bin_only" / "adapter_config.json").write_text("{}")
    (adapters / "bin_only" / "adapter_model.bin").write_bytes(b"pickle")
    return root


@dataclass
class Reply:
    status: int
    headers: dict
    text: str

    @property
    def json(self):
        return json.loads(self.text)


class Served:
    """A running server: its URL, the backend and app state behind it, plain HTTP calls."""

    def __init__(self, url: str, app, backend, root: Path):
        self.url, self.app, self.backend, self.root = url, app, backend, root
        self.state = app.state.server
        self.host, self.port = url.removeprefix("http://").split(":")

    def call(self, method: str, path: str, body=None, *, raw: bytes | None = None, headers: dict | None = None) -> Reply:
        conn = http.client.HTTPConnection(self.host, int(self.port), timeout=60)
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        reply = Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read().decode())
        conn.close()
        return reply

    def client(self, key: str = "none"):
        from openai import OpenAI

        return OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=60)

    def chat(self, model: str | None = None, max_tokens: int = 12, **kw) -> str:
        r = self.client().chat.completions.create(
            model=model or self.backend.model_id, messages=MESSAGES, max_tokens=max_tokens, temperature=0, **kw
        )
        return r.choices[0].message.content

    def set_adapters(self, body) -> Reply:
        reply = self.call("POST", "/lora-adapters", body)
        assert reply.status == 200, reply.text
        return reply


def start_server(app):
    """uvicorn in a thread on a free loopback port; returns (url, stop)."""
    from engine.serve.server import bind, url_of, uvicorn_server

    sock = bind("127.0.0.1", 0)
    server = uvicorn_server(app)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.02)
    assert server.started, "uvicorn did not start"

    def stop():
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()

    return url_of(sock), stop


def running(app, backend, root: Path):
    """For a module fixture: ``yield from running(app, backend, root)`` serves, then stops and closes."""
    url, stop = start_server(app)
    try:
        yield Served(url, app, backend, root)
    finally:
        stop()
        backend.close()


def serve_files(root: Path, *, api_key: str | None = None, **spec_kw):
    from engine.model import HfSpec as ModelSpec
    from engine.serve.adapters import AdapterDirs
    from engine.serve.app import build_app
    from engine.serve.backends.hf import HfSpec, load_hf

    spec = HfSpec(kind="hf", port=0, device="cpu", adapter_dirs=[str(root / "adapters")], context_length=128, **spec_kw)
    run_adapter = root / "adapters" / "runs" / "r1" / "adapter"
    backend = load_hf(
        spec,
        model_spec=ModelSpec(kind="hf", name_or_path=str(root / "base")),
        adapter_paths={"a": run_adapter},
        run_info={"a": {"run": "r1", "recipe": "lora_tiny"}},
    )
    app = build_app(backend, spec, api_key=api_key, adapter_dirs=AdapterDirs(spec.adapter_dirs))
    return app, backend


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    return make_files(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def served(files):
    yield from running(*serve_files(files, max_batch=2, queue=1, max_body_bytes=4096), files)


@pytest.fixture
def slow_tokens(monkeypatch):
    """Each token takes ``delay`` seconds (the model still computes it): streams overlap other calls."""
    from engine.serve.backends import hf_batch

    made = {"tokens": 0}
    real = hf_batch._pick

    def pick(*args):
        made["tokens"] += 1
        time.sleep(made.get("delay", 0.05))
        return real(*args)

    monkeypatch.setattr(hf_batch, "_pick", pick)
    return made


@pytest.fixture(autouse=True)
def base_alone(request):
    """Every test starts with no adapter active (tests share one server)."""
    if "served" in request.fixturenames:
        request.getfixturevalue("served").state.active = ()


def expected(backend, adapters: dict[str, float], max_tokens: int = 12) -> str:
    """The greedy completion of MESSAGES with this adapter set, straight from the backend."""
    from engine.serve.backend import AdapterScale, GenerateRequest

    ids = backend.render_chat(MESSAGES)
    request = GenerateRequest(ids, max_tokens, temperature=0, adapters=tuple(AdapterScale(n, s) for n, s in adapters.items()))
    return "".join(p.text for p in backend.generate(request))


def wait_for(condition, timeout: float = 20.0) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.01)


# --- the official client ---------------------------------------------------------------------


def test_openai_client_lists_models_chats_streams_and_completes(served):
    client = served.client()
    models = {m.id: m for m in client.models.list().data}
    base = served.backend.model_id
    assert set(models) == {base, "a"} | ({"b"} & set(models))
    assert models["a"].model_extra["run"] == "r1" and models["a"].model_extra["recipe"] == "lora_tiny"
    assert models[base].model_extra["kind"] == "base"

    want = expected(served.backend, {})
    r = client.chat.completions.create(model=base, messages=MESSAGES, max_tokens=12, temperature=0)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == want
    assert r.usage.completion_tokens + r.usage.prompt_tokens == r.usage.total_tokens
    assert r.usage.prompt_tokens == len(served.backend.render_chat(MESSAGES))

    chunks = list(
        client.chat.completions.create(
            model=base, messages=MESSAGES, max_tokens=12, temperature=0, stream=True, stream_options={"include_usage": True}
        )
    )
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == r.usage.total_tokens

    c = client.completions.create(model=base, prompt="The river", max_tokens=6, temperature=0)
    assert c.object == "text_completion" and c.usage.completion_tokens <= 6
    streamed = client.completions.create(model=base, prompt="The river", max_tokens=6, temperature=0, stream=True)
    assert "".join(ch.choices[0].text for ch in streamed) == c.choices[0].text


def test_sse_stream_ends_with_done(served):
    reply = served.call(
        "POST",
        "/v1/chat/completions",
        {"model": served.backend.model_id, "messages": MESSAGES, "max_tokens": 4, "stream": True},
    )
    assert reply.status == 200 and reply.headers["content-type"].startswith("text/event-stream")
    events = [e for e in reply.text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["choices"][0]["delta"]["role"] == "assistant"


def test_sampling_parameters_are_honoured(served):
    client, base = served.client(), served.backend.model_id
    kw = dict(model=base, messages=MESSAGES, max_tokens=10, temperature=1.5, top_p=0.9)
    same = [client.chat.completions.create(seed=7, **kw).choices[0].message.content for _ in range(2)]
    assert same[0] == same[1]  # a seed makes sampling reproducible
    r = client.chat.completions.create(model=base, messages=MESSAGES, max_tokens=3, temperature=0)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3
    # A stop string: the text ends before it and the finish reason says so.
    full = expected(served.backend, {}, max_tokens=12)
    stop = next((full[i : i + 2] for i in range(2, len(full) - 2) if full[i : i + 2].strip()), None)
    if stop:
        r = client.chat.completions.create(model=base, messages=MESSAGES, max_tokens=12, temperature=0, stop=[stop])
        assert r.choices[0].message.content == full[: full.index(stop)] and r.choices[0].finish_reason == "stop"
    parts = [{"role": "user", "content": [{"type": "text", "text": "Why do rivers "}, {"type": "text", "text": "meander?"}]}]
    r = client.chat.completions.create(model=base, messages=parts, max_tokens=12, temperature=0)
    assert r.choices[0].message.content == expected(served.backend, {})


# --- adapters ---------------------------------------------------------------------------------


def test_adapters_change_the_output_and_model_picks_one_per_request(served):
    served.set_adapters({"adapters": [{"path": "b", "scale": 1.0}]})  # loads b from the adapter dir
    served.set_adapters([])
    alone, a, b = (expected(served.backend, s) for s in ({}, {"a": 1.0}, {"b": 1.0}))
    assert len({alone, a, b}) == 3, "each random adapter must change the greedy output"
    assert served.chat(model="a") == a  # per request ...
    assert served.chat(model="b") == b
    assert served.chat() == alone  # ... without changing what the base id serves
    assert served.state.active == ()
    listed = served.call("GET", "/lora-adapters").json
    assert [x["name"] for x in listed] == ["a", "b"] and all(x["scale"] == 0.0 for x in listed)


def test_switch_and_blend_while_a_stream_runs(served, slow_tokens):
    """A running response keeps its adapter set; the next request sees the new one; [] clears."""
    base = served.backend.model_id
    served.set_adapters({"adapters": [{"path": "b", "scale": 1.0}]})
    served.set_adapters({"adapters": [{"name": "a", "scale": 1.0}]})
    slow_tokens["delay"] = 0
    want_a, want_b = expected(served.backend, {"a": 1.0}, 24), expected(served.backend, {"b": 1.0}, 24)
    want_blend = expected(served.backend, {"a": 0.5, "b": 0.5}, 24)
    assert len({want_a, want_b, want_blend}) == 3
    slow_tokens["delay"], slow_tokens["tokens"] = 0.05, 0

    got = {}

    def stream():
        chunks = served.client().chat.completions.create(model=base, messages=MESSAGES, max_tokens=24, temperature=0, stream=True)
        got["text"] = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    reader = threading.Thread(target=stream)
    reader.start()
    wait_for(lambda: slow_tokens["tokens"] >= 3)
    served.set_adapters([{"id": 1, "scale": 1.0}])  # llama.cpp server's shape: b, mid-stream
    assert served.state.gate.inside == 1, "the switch did not wait for the running response"
    reader.join(timeout=60)
    assert slow_tokens["tokens"] >= 20, "the stream ended before the switch"
    assert got["text"] == want_a
    slow_tokens["delay"] = 0
    assert served.chat(max_tokens=24) == want_b

    served.set_adapters({"adapters": [{"name": "a", "scale": 0.5}, {"name": "b", "scale": 0.5}]})
    assert served.chat(max_tokens=24) == want_blend
    assert {m["id"]: m for m in served.call("GET", "/v1/models").json["data"]}[base]["active_adapters"] == [
        {"name": "a", "scale": 0.5},
        {"name": "b", "scale": 0.5},
    ]
    served.set_adapters({"adapters": []})
    assert served.chat(max_tokens=24) == expected(served.backend, {}, 24)


# --- concurrency -----------------------------------------------------------------------------


def test_queue_full_gets_429_with_retry_after(served, slow_tokens):
    body = {"model": served.backend.model_id, "messages": MESSAGES, "max_tokens": 30, "temperature": 0}
    replies = []
    workers = [
        threading.Thread(target=lambda: replies.append(served.call("POST", "/v1/chat/completions", body))) for _ in range(3)
    ]
    for w in workers[:2]:  # max_batch=2: both run in the batch
        w.start()
    wait_for(lambda: slow_tokens["tokens"] >= 2)
    workers[2].start()  # waits for a place: queue=1
    wait_for(lambda: served.state.gate.inside == 3)
    full = served.call("POST", "/v1/chat/completions", body)
    assert full.status == 429 and full.headers["retry-after"] == "1"
    assert full.json["error"]["type"] == "rate_limit_error" and full.json["error"]["code"] == "queue_full"
    assert served.call("GET", "/health").status == 200  # the event loop is free while the model works
    for w in workers:
        w.join(timeout=60)
    assert [r.status for r in replies] == [200, 200, 200]
    assert len({r.text.split('"content":')[1] for r in replies}) == 1  # the same request: the same answer, in company or not
    assert served.state.gate.inside == 0


def test_client_gone_mid_stream_stops_generation_and_frees_the_slot(served, slow_tokens):
    body = {"model": served.backend.model_id, "messages": MESSAGES, "max_tokens": 100, "stream": True}
    conn = http.client.HTTPConnection(served.host, int(served.port), timeout=30)
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    resp.read1(64)
    wait_for(lambda: slow_tokens["tokens"] >= 3)
    conn.sock.close()  # the client goes away mid-stream
    conn.close()
    wait_for(lambda: served.state.gate.inside == 0, timeout=10)
    assert slow_tokens["tokens"] < 60, "generation went on after the client left"
    assert served.chat(max_tokens=2) is not None


# --- the fence, unit-level ---------------------------------------------------------------------


def test_adapter_dirs_resolve_only_adapters_inside(files):
    from engine.serve.adapters import AdapterDirs, AdapterPathError

    fence = AdapterDirs([files / "adapters"])
    found = fence.resolve("runs/r1/adapter")
    assert found.format == "peft" and found.name == "runs/r1/adapter" and (found.run, found.recipe) == ("r1", "lora_tiny")
    assert fence.resolve(str(files / "adapters" / "b")).name == "b"  # absolute, but inside
    assert fence.resolve("b/adapter_model.safetensors").path == (files / "adapters" / "b").resolve()
    for given, code in [
        ("../base", "adapter_path_not_allowed"),
        ("b/../../base", "adapter_path_not_allowed"),
        (str(files / "outside" / "evil"), "adapter_path_not_allowed"),
        ("link", "adapter_path_not_allowed"),
        ("notes.txt", "not_an_adapter"),
        ("fake.gguf", "not_an_adapter"),
        ("bin_only", "not_an_adapter"),
        ("missing", "adapter_not_found"),
    ]:
        with pytest.raises(AdapterPathError) as err:
            fence.resolve(given)
        assert err.value.code == code, given
        assert str(files) not in str(err.value)
    with pytest.raises(AdapterPathError, match="no adapter directories"):
        AdapterDirs([]).resolve("b")


# --- config and the stage -----------------------------------------------------------------------


@pytest.fixture
def no_key(monkeypatch, tmp_path):
    from engine.settings import settings

    monkeypatch.delenv("ENGINE_API_KEY", raising=False)
    monkeypatch.chdir(tmp_path)  # no .env here
    settings.cache_clear()
    yield
    settings.cache_clear()


def test_serve_config_refuses_a_missing_key_and_an_open_host_without_one(no_key, monkeypatch):
    from engine.settings import settings

    base = ["recipe=serve_smollm2", "model=tiny", "serve=hf"]
    with pytest.raises(ConfigError, match="serve.api_key: true, but no key is set"):
        compose([*base, "serve.api_key=true"])
    with pytest.raises(ConfigError, match=r"serve.host: 0.0.0.0 is reachable from other machines"):
        compose([*base, "serve.host=0.0.0.0"])
    monkeypatch.setenv("ENGINE_API_KEY", "a-long-random-key")
    settings.cache_clear()
    cfg = compose([*base, "serve.host=0.0.0.0", "serve.api_key=true"])
    assert cfg.serve.kind == "hf" and cfg.serve.api_key
    assert compose(["recipe=serve_smollm2"]).serve.kind == "llamacpp"


def fake_run(root: Path) -> Path:
    """A finished lora run dir of the tiny model: its config.yaml and a (random) PEFT adapter/."""
    import yaml

    raw = compose(["recipe=lora_smollm2", "model=tiny"], check=False)
    run = root / "lora_smollm2" / "2026-01-01_00-00-00"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(raw))
    save_adapter(run / "adapter", seed=1)
    return run


def test_open_backend_loads_serve_adapters_and_a_layered_runs_levels_active_with_their_scales(files, tmp_path):
    """What the serve, chat and adapter_matrix stages open: serve.adapters (inside the fence) first,
    then the evaluated run's weights, active; a bad serve.adapters entry is a config error by key."""
    from types import SimpleNamespace

    from engine.model import TinySpec
    from engine.serve.backend import AdapterScale, BackendSource
    from engine.serve.backends import open_backend
    from engine.serve.backends.hf import HfSpec

    layered = tmp_path / "layered_run"
    save_adapter(layered / "adapter" / "level_1", seed=4)
    save_adapter(layered / "adapter" / "level_2", seed=5)
    (layered / "config.yaml").write_text("recipe: layered_tiny\n")
    spec = HfSpec(kind="hf", device="cpu", adapter_dirs=[str(files / "adapters")], adapters={"b": "b"})
    source = BackendSource(TinySpec(kind="tiny"), adapter=SimpleNamespace(scales=[1.0, 0.5]), evaluated=layered)
    opened = open_backend(spec, source)
    try:
        levels = ["layered_run/level_1", "layered_run/level_2"]
        assert opened.active == (AdapterScale(levels[0], 1.0), AdapterScale(levels[1], 0.5))
        listed = [(a.name, a.run, a.recipe) for a in opened.backend.adapters()]
        assert listed == [("b", None, None), *((name, "layered_run", "layered_tiny") for name in levels)]
    finally:
        opened.backend.close()
    bad = HfSpec(kind="hf", device="cpu", adapter_dirs=[str(files / "adapters")], adapters={"x": "../base"})
    with pytest.raises(ConfigError, match=r"serve.adapters.x: adapter paths may not contain '..'"):
        open_backend(bad, BackendSource(TinySpec(kind="tiny")))


def test_serve_recipe_serves_a_run_prints_its_url_and_stops_on_sigterm(tmp_path):
    """The recipe is the command: a finished run's adapter served and active, the real port printed,
    the API answering, SIGTERM ending it cleanly (exit 0, metrics recorded)."""
    run = fake_run(tmp_path / "outputs")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("ENGINE_API_KEY", None)
    args = ["recipe=serve_smollm2", "serve=hf", "serve.port=0", "device=cpu", f"eval.run_dir={run}"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "engine", *args, f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = None
        for line in proc.stdout:
            if line.startswith("Serving on "):
                url = line.split()[2]
                assert line.strip().endswith(f"(playground at {line.split()[2]}/, OpenAI API at {line.split()[2]}/v1)")
                break
        assert url and not url.endswith(":0"), url
        from openai import OpenAI

        client = OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        models = {m.id: m.model_extra for m in client.models.list().data}
        assert set(models) == {"tiny", run.name}
        assert models["tiny"]["active_adapters"] == [{"name": run.name, "scale": 1.0}]
        assert (models[run.name]["run"], models[run.name]["recipe"]) == (run.name, "lora_smollm2")
        r = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4)
        assert r.usage.completion_tokens >= 1
        streams = [Drained(client, i) for i in range(3)]  # a batch running when SIGTERM comes
        wait_for(lambda: all(s.chunks >= 2 for s in streams), timeout=60)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    for s in streams:  # SIGTERM drained the batch: every stream ran to its end
        s.join(timeout=30)
        assert s.finish in ("stop", "length") and s.usage is not None and s.usage.completion_tokens >= 2, vars(s)
    assert proc.returncode == 0, err[-3000:]
    assert "Traceback" not in err
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())["serve"]
    assert metrics["url"] == url and metrics["backend"] == "hf" and metrics["stopped_by"] == "SIGTERM"
    assert metrics["active"] == {run.name: 1.0} and metrics["requests"] == 4


class Drained(threading.Thread):
    """A streaming chat in the background: how many chunks came, its finish reason and usage."""

    def __init__(self, client, i: int):
        super().__init__(daemon=True)
        self.client, self.i, self.chunks, self.finish, self.usage = client, i, 0, None, None
        self.start()

    def run(self) -> None:
        messages = [{"role": "user", "content": f"Count to a hundred, {self.i}."}]
        stream = self.client.chat.completions.create(
            model="tiny", messages=messages, max_tokens=64, temperature=0, stream=True, stream_options={"include_usage": True}
        )
        for chunk in stream:
            self.chunks += 1
            if chunk.choices and chunk.choices[0].finish_reason:
                self.finish = chunk.choices[0].finish_reason
            if chunk.usage is not None:
                self.usage = chunk.usage
