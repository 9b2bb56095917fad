"""The playground's routes over a real server: the page and its files, the read-only runs
API, and its fence around the outputs dir (engine/serve/ui.py).

The server is the real app (engine/serve/app.py) on the tiny model's hf backend, under
uvicorn in a thread; requests go over a socket with ``http.client`` so paths reach the
server exactly as written (``..`` and ``%2e%2e`` included).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import re
import shutil
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

KEY = "sk-test-ui-0123456789"
STAMP = "2026-01-02_03-04-05"
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 32  # enough for a content check; the page only shows it


# --- harness (test_ui_browser.py uses it too) ----------------------------------------


@contextlib.contextmanager
def serving(app):
    """The app under uvicorn on a free loopback port, in a thread; yields its URL."""
    from engine.serve.server import bind, url_of, uvicorn_server

    sock = bind("127.0.0.1", 0)
    server = uvicorn_server(app)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield url_of(sock)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def call(url: str, path: str, *, method: str = "GET", body=None, key: str | None = None) -> tuple[int, dict, bytes]:
    """(status, headers, body) of one request, the path sent as is."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    try:
        conn.request(method, path, body=data, headers=headers)
        res = conn.getresponse()
        return res.status, {k.lower(): v for k, v in res.getheaders()}, res.read()
    finally:
        conn.close()


def tiny_backend(adapters: dict[str, Path] | None = None, run_info: dict | None = None):
    """The tiny model (random init, fixed seed) in the hf backend, with PEFT adapters loaded."""
    from engine.model import TinySpec
    from engine.serve.backends.hf import HfSpec, load_hf

    spec = HfSpec(kind="hf", device="cpu", context_length=512, default_max_tokens=16, threads=1)
    backend = load_hf(spec, model_spec=TinySpec(kind="tiny"), adapter_paths=adapters or {}, run_info=run_info or {})
    return backend, spec


def write_run(folder: Path, *, recipe: str, stages: list[str], metrics: dict, files: dict[str, bytes] | None = None) -> Path:
    """A run dir as the pipeline leaves it: config.yaml (recipe, stages), metrics.json, files."""
    folder.mkdir(parents=True)
    stage_lines = "".join(f"- {s}\n" for s in stages)
    (folder / "config.yaml").write_text(f"stages:\n{stage_lines}seed: 0\nmodel:\n  kind: tiny\nrecipe: {recipe}\n")
    (folder / "metrics.json").write_text(json.dumps(metrics))
    for name, data in (files or {}).items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return folder


# --- fixtures ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def backend():
    backend, spec = tiny_backend()
    yield backend, spec
    backend.close()


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> Path:
    """An outputs dir: a finished run, an incomplete one, a sweep with two jobs, a symlinked
    run dir leading outside, a run whose report is a symlink out, and a hidden folder."""
    base = tmp_path_factory.mktemp("ui")
    root = base / "outputs"
    outside = base / "elsewhere"
    secret = write_run(outside / "secret_run", recipe="secret", stages=["train"], metrics={"train": {"steps": 1}})
    (secret / "report.html").write_text("<p>secret</p>")
    metrics = {
        "prepare_data": {"rows_read": 10},
        "train": {"steps": 2, "final_loss": 1.5, "best_val_loss": None, "tokens_per_s": 99.5, "adapter_dir": str(base)},
        "evaluate": {
            "test": {"rougeL": 0.4, "perplexity": float("nan"), "cosine": 0.8},
            "lm_eval": {"mc": {"examples": 24, "acc": 0.6}},
            "base": {"test": {"rougeL": 0.2, "cosine": 0.7}, "lm_eval": {"mc": {"acc": 0.5}}},
            "cosine_backend": "minilm",
            "examples": 4,
        },
        "report": {"path": str(base / "x" / "report.md")},
    }
    finished = write_run(
        root / "lora_tiny" / STAMP,
        recipe="lora_tiny",
        stages=["prepare_data", "train", "evaluate", "report"],
        metrics=metrics,
        files={"report.html": b"<h1>report of the finished run</h1>", "loss.png": PNG, "plots/metrics.png": PNG},
    )
    (finished / "adapter").mkdir()
    (finished / "adapter" / "adapter_model.safetensors").write_bytes(b"weights")
    (finished / "checkpoints" / "step_2").mkdir(parents=True)
    (finished / "checkpoints" / "step_2" / "config.yaml").write_text("recipe: not_a_run\n")
    write_run(
        root / "lora_tiny" / "2026-01-01_00-00-00",
        recipe="lora_tiny",
        stages=["prepare_data", "train", "evaluate"],
        metrics={"prepare_data": {}, "train": {"steps": 1}},
    )
    sweep = root / "lora_tiny" / "multirun_2026-01-03_00-00-00"
    for job in ("0", "1"):
        write_run(
            sweep / job,
            recipe="lora_tiny",
            stages=["train"],
            metrics={"train": {"steps": 2, "final_loss": 1.0 + int(job)}},
            files={"loss.png": PNG},
        )
    (sweep / "1" / "sweep_job.json").write_text(json.dumps({"status": "failed", "error": "RuntimeError: boom"}))
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    (sweep / "sweep_summary.csv").write_text("job,adapter.r,final_loss\n0,4,1.0\n1,8,2.0\n")
    (sweep / "sweep_summary.md").write_text("| job | r |\n")
    (sweep / "sweep_summary.html").write_text("<table><tr><td>0</td></tr></table>")
    (sweep / "sweep_final_loss.png").write_bytes(PNG)
    (root / "linked").mkdir()
    (root / "linked" / STAMP).symlink_to(secret, target_is_directory=True)
    sneaky = write_run(root / "sneaky" / STAMP, recipe="sneaky", stages=["train"], metrics={"train": {"steps": 1}})
    (sneaky / "report.html").symlink_to(secret / "report.html")
    write_run(root / ".trash" / STAMP, recipe="hidden", stages=["train"], metrics={})
    return root


@pytest.fixture(scope="module")
def server(backend, outputs):
    from engine.serve.app import build_app

    b, spec = backend
    with serving(build_app(b, spec, outputs_dir=outputs)) as url:
        yield url


@pytest.fixture(scope="module")
def keyed_server(backend, outputs):
    from engine.serve.app import build_app

    b, spec = backend
    with serving(build_app(b, spec, api_key=KEY, outputs_dir=outputs)) as url:
        yield url


def runs(url: str, key: str | None = None) -> dict:
    status, _, body = call(url, "/ui/runs", key=key)
    assert status == 200, body
    return json.loads(body)


def assert_openai_error(status: int, body: bytes, expected: int, outputs: Path) -> dict:
    assert status == expected, body
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert str(outputs.parent) not in body.decode(), "a local path leaked"
    return error


# --- the page ------------------------------------------------------------------------


def test_the_page_and_its_own_files_are_served_with_a_strict_policy(server):
    status, headers, page = call(server, "/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    policy = headers["content-security-policy"]
    assert "script-src 'self'" in policy and "connect-src 'self'" in policy and "frame-ancestors 'none'" in policy
    html = page.decode()
    # Nothing from elsewhere: every script and style sheet is one of ours.
    refs = [r for r in re.findall(r'(?:src|href)="([^"]+)"', html) if r != "data:,"]  # data:, = no favicon request
    assert sorted(refs) == ["/ui/static/app.js", "/ui/static/style.css"]
    for name, kind in [("app.js", "text/javascript"), ("style.css", "text/css")]:
        status, headers, body = call(server, f"/ui/static/{name}")
        assert status == 200 and headers["content-type"].startswith(kind)
        text = body.decode()
        assert "http://" not in text and "https://" not in text and "@import" not in text
    assert call(server, "/ui")[0] == 307


def test_the_page_has_a_stable_id_for_every_control_the_browser_test_drives(server):
    html = call(server, "/")[2].decode()
    for testid in [
        "chat-input", "chat-send", "chat-stop", "chat-log", "model-select", "temperature", "top-p",
        "max-tokens", "system-prompt", "adapters-apply", "adapters-clear", "adapters-state",
        "compare-prompt", "compare-left", "compare-right", "compare-run", "compare-left-stats",
        "compare-right-stats", "tab-runs", "runs-table", "run-viewer", "key-form", "key-input",
    ]:  # fmt: skip
        assert f'data-testid="{testid}"' in html, testid
    # Every form control has a label.
    for control in re.findall(r"<(?:input|select|textarea)[^>]*\bid=\"([^\"]+)\"", html):
        assert f'for="{control}"' in html, control


def test_unknown_static_files_are_openai_shaped_404s(server, outputs):
    for path in ["/ui/static/nope.js", "/ui/static/..%2f..%2fui.py", "/ui/static/../ui.py"]:
        status, _, body = call(server, path)
        assert_openai_error(status, body, 404, outputs)


# --- the runs listing ----------------------------------------------------------------


def test_runs_are_listed_newest_first_with_recipe_time_status_metrics_and_files(server, outputs):
    listing = runs(server)
    assert listing["outputs"] == "outputs"
    by_id = {r["id"]: r for r in listing["data"]}
    sweep_id = "lora_tiny/multirun_2026-01-03_00-00-00"
    assert [r["id"] for r in listing["data"]] == [
        sweep_id,
        f"{sweep_id}/0",
        f"{sweep_id}/1",
        f"lora_tiny/{STAMP}",
        f"sneaky/{STAMP}",
        "lora_tiny/2026-01-01_00-00-00",
    ]
    done = by_id[f"lora_tiny/{STAMP}"]
    assert done["kind"] == "run" and done["recipe"] == "lora_tiny" and done["time"] == "2026-01-02 03:04:05"
    assert done["status"] == "ok" and done["stages"] == ["prepare_data", "train", "evaluate", "report"]
    assert done["files"] == ["loss.png", "plots/metrics.png", "report.html"]
    metrics = {m["name"]: (m["value"], m["base"]) for m in done["metrics"]}
    assert metrics == {
        "train.steps": (2, None),
        "train.final_loss": (1.5, None),
        "train.tokens_per_s": (99.5, None),
        "test.rougeL": (0.4, 0.2),
        "test.cosine": (0.8, 0.7),
        "lm_eval.mc.acc": (0.6, 0.5),
    }  # no NaN, no strings, no counts, no paths
    assert by_id["lora_tiny/2026-01-01_00-00-00"]["status"] == "incomplete"
    sweep = by_id[sweep_id]
    assert sweep["kind"] == "sweep" and sweep["status"] == "failed"  # its jobs: ok, failed
    assert sweep["files"] == ["sweep_final_loss.png", "sweep_summary.csv", "sweep_summary.html", "sweep_summary.md"]
    assert by_id[f"{sweep_id}/0"]["sweep"] == sweep_id and by_id[f"{sweep_id}/0"]["files"] == ["loss.png"]
    assert by_id[f"{sweep_id}/0"]["status"] == "ok" and by_id[f"{sweep_id}/1"]["status"] == "failed"


def test_the_listing_holds_no_local_path_and_counts_what_leads_outside(server, outputs):
    status, _, body = call(server, "/ui/runs")
    text = body.decode()
    assert str(outputs.parent) not in text and "elsewhere" not in text and "secret" not in text
    assert json.loads(text)["skipped"] == 1  # linked/<stamp> -> elsewhere/secret_run
    assert "checkpoints" not in text and ".trash" not in text


def test_a_runs_listing_follows_the_outputs_dir_as_runs_appear(server, outputs):
    new = write_run(outputs / "late" / "2026-02-01_00-00-00", recipe="late", stages=["train"], metrics={"train": {}})
    try:
        assert runs(server)["data"][0]["id"] == "late/2026-02-01_00-00-00"
    finally:
        shutil.rmtree(new.parent)


# --- a run's files -------------------------------------------------------------------


def test_a_runs_report_plots_and_sweep_summaries_are_served_as_sandboxed_documents(server, outputs):
    status, headers, body = call(server, f"/ui/runs/lora_tiny/{STAMP}/report.html")
    assert status == 200 and body == (outputs / "lora_tiny" / STAMP / "report.html").read_bytes()
    assert headers["content-type"].startswith("text/html")
    assert headers["content-security-policy"].startswith("sandbox") and headers["x-content-type-options"] == "nosniff"
    status, headers, body = call(server, f"/ui/runs/lora_tiny/{STAMP}/plots/metrics.png")
    assert status == 200 and headers["content-type"] == "image/png" and body == PNG
    sweep = "lora_tiny/multirun_2026-01-03_00-00-00"
    status, headers, body = call(server, f"/ui/runs/{sweep}/sweep_summary.csv")
    assert status == 200 and headers["content-type"].startswith("text/csv") and body.startswith(b"job,adapter.r")
    assert call(server, f"/ui/runs/{sweep}/sweep_final_loss.png")[0] == 200
    assert call(server, f"/ui/runs/{sweep}/1/loss.png")[0] == 200  # a job of the sweep: the longest id wins


@pytest.mark.parametrize(
    "path, status, code",
    [
        (f"/ui/runs/lora_tiny/{STAMP}/../../linked/{STAMP}/report.html", 400, "invalid_path"),
        (f"/ui/runs/lora_tiny/{STAMP}/%2e%2e/%2e%2e/linked/{STAMP}/report.html", 400, "invalid_path"),
        ("/ui/runs//etc/passwd", 400, "invalid_path"),
        (f"/ui/runs/lora_tiny/{STAMP}/..%5c..%5cconfig.yaml", 400, "invalid_path"),
        (f"/ui/runs/lora_tiny/{STAMP}/config.yaml", 400, "file_not_allowed"),
        (f"/ui/runs/lora_tiny/{STAMP}/metrics.json", 400, "file_not_allowed"),
        (f"/ui/runs/lora_tiny/{STAMP}/adapter/adapter_model.safetensors", 400, "file_not_allowed"),
        (f"/ui/runs/lora_tiny/{STAMP}/plots/../config.yaml", 400, "invalid_path"),
        (f"/ui/runs/linked/{STAMP}/report.html", 404, "run_not_found"),
        (f"/ui/runs/lora_tiny/{STAMP}/checkpoints/step_2/report.html", 400, "file_not_allowed"),
        ("/ui/runs/lora_tiny/report.html", 404, "run_not_found"),
        (f"/ui/runs/.trash/{STAMP}/report.html", 404, "run_not_found"),
        (f"/ui/runs/sneaky/{STAMP}/report.html", 403, "file_not_allowed"),
        (f"/ui/runs/sneaky/{STAMP}/loss.png", 404, "file_not_found"),
    ],
)
def test_nothing_outside_a_listed_runs_shared_files_is_served(server, outputs, path, status, code):
    got, _, body = call(server, path)
    error = assert_openai_error(got, body, status, outputs)
    assert error["code"] == code
    assert b"secret" not in body
    assert call(server, "/health")[0] == 200  # and the server keeps serving


# --- the key, and no outputs dir -------------------------------------------------------


def test_with_a_key_the_runs_api_needs_it_and_the_page_does_not(keyed_server, outputs):
    for path in ["/ui/runs", f"/ui/runs/lora_tiny/{STAMP}/report.html", "/v1/models"]:
        status, _, body = call(keyed_server, path)
        assert assert_openai_error(status, body, 401, outputs)["code"] == "missing_api_key"
        status, _, body = call(keyed_server, path, key="wrong")
        assert assert_openai_error(status, body, 401, outputs)["code"] == "invalid_api_key"
        assert call(keyed_server, path, key=KEY)[0] == 200
    # The page holds no data; it asks for the key when a call answers 401.
    for path in ["/", "/ui/static/app.js", "/ui/static/style.css", "/health"]:
        assert call(keyed_server, path)[0] == 200, path


def test_without_an_outputs_dir_the_runs_view_is_empty_and_says_so(backend, outputs):
    from engine.serve.app import build_app

    b, spec = backend
    with serving(build_app(b, spec)) as url:
        assert runs(url) == {"object": "list", "outputs": None, "data": [], "skipped": 0}
        status, _, body = call(url, f"/ui/runs/lora_tiny/{STAMP}/report.html")
        assert assert_openai_error(status, body, 404, outputs)["code"] == "run_not_found"


def test_the_chat_route_the_page_streams_from_answers_under_the_same_app(server):
    """The page's chat call, as app.js sends it: stream with usage, read up to [DONE]."""
    status, _, body = call(server, "/v1/models")
    model = json.loads(body)["data"][0]["id"]
    request = {
        "model": model,
        "messages": [{"role": "user", "content": "hello"}],
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": 0,
        "max_tokens": 5,
    }
    status, headers, body = call(server, "/v1/chat/completions", method="POST", body=request)
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    lines = [line[5:].strip() for line in body.decode().splitlines() if line.startswith("data:")]
    assert lines[-1] == "[DONE]"
    usage = json.loads(lines[-2])["usage"]
    assert usage["completion_tokens"] == 5 and usage["prompt_tokens"] > 0
