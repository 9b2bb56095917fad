"""The playground in a real browser: Debian's chromium driven by Playwright's Python package
(no browser download: ``executable_path`` points at the system chromium).

Against the real server on ``model=tiny`` (hf backend) with one PEFT adapter from a real
tiny training run, whose run dir also sits in the outputs dir the runs view lists: the page
loads, a chat message streams an answer equal to the server's own non-streamed answer at
temperature 0, an adapter slider applied through the page shows in GET /lora-adapters,
side by side streams two answers with latency and token counts, a run's report and loss
plot open, and with the API key on the page asks for it and then works.

Screenshots go to tests/artifacts/ui/ (ignored by git; CI keeps them as artifacts).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from conftest import ROOT, run_engine
from test_ui import KEY, call, serving, tiny_backend

sync_api = pytest.importorskip(
    "playwright.sync_api", reason="Playwright's Python package is missing (pip install -e '.[dev]' installs it)"
)
expect = sync_api.expect
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    pytest.mark.slow,  # a real training run and a browser: minutes on 2 cores
    pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install chromium; .ci/run does)"),
]
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]
ARTIFACTS = ROOT / "tests" / "artifacts" / "ui"
RUN_ID = "lora_smollm2/2026-01-02_03-04-05"
ADAPTER = "tiny-lora"
PROMPT = "hello"
MAX_TOKENS = 24
TIMEOUT_MS = 120_000


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> Path:
    """outputs/ with one real finished tiny run. A high learning rate for 30 steps: the tiny
    random model then answers with visible text through its adapter (its base answers blank lines)."""
    root = tmp_path_factory.mktemp("ui_browser") / "outputs"
    proc = run_engine(
        "model=tiny",
        "train.max_steps=30",
        "train.lr=1e-2",
        "train.warmup_steps=0",
        "train.micro_batch_size=2",
        "train.grad_accum=1",
        "eval.max_examples=4",
        "eval.max_new_tokens=8",
        "precision=fp32",
        "device=cpu",
        f"hydra.run.dir={root / RUN_ID}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root


@pytest.fixture(scope="module")
def backend(outputs):
    run = outputs / RUN_ID
    backend, spec = tiny_backend({ADAPTER: run / "adapter"}, {ADAPTER: {"run": run.name, "recipe": "lora_smollm2"}})
    yield backend, spec
    backend.close()


@pytest.fixture(scope="module")
def server(backend, outputs):
    from engine.serve.adapters import AdapterDirs
    from engine.serve.app import build_app

    b, spec = backend
    with serving(build_app(b, spec, adapter_dirs=AdapterDirs([outputs]), outputs_dir=outputs)) as url:
        yield url


@pytest.fixture(scope="module")
def keyed_server(backend, outputs):
    from engine.serve.app import build_app

    b, spec = backend
    with serving(build_app(b, spec, api_key=KEY, outputs_dir=outputs)) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    expect.set_options(timeout=TIMEOUT_MS)
    problems: list[str] = []
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    yield page
    context.close()
    # 401s the page answers by asking for the key are expected; nothing else is.
    assert [p for p in problems if "401" not in p] == []


def shot(page, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    print(f"screenshot: {path}")
    return path


def server_answer(url: str, model: str, key: str | None = None) -> tuple[str, dict]:
    """The server's own non-streamed answer and usage for what the page sends."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": PROMPT}],
        "temperature": 0,
        "top_p": 1,
        "max_tokens": MAX_TOKENS,
    }
    status, _, raw = call(url, "/v1/chat/completions", method="POST", body=body, key=key)
    assert status == 200, raw
    out = json.loads(raw)
    return out["choices"][0]["message"]["content"], out["usage"]


def lora_state(url: str, key: str | None = None) -> dict[str, tuple[float, bool]]:
    status, _, raw = call(url, "/lora-adapters", key=key)
    assert status == 200, raw
    return {a["name"]: (a["scale"], a["active"]) for a in json.loads(raw)}


def open_page(page, url: str) -> None:
    page.goto(url)
    page.wait_for_selector("body[data-ready=true]")


def greedy_settings(page) -> None:
    page.get_by_test_id("temperature").focus()
    page.keyboard.press("Home")  # the range's minimum: 0, greedy
    assert page.get_by_test_id("temperature").input_value() == "0"
    page.get_by_test_id("max-tokens").fill(str(MAX_TOKENS))


def test_a_chat_message_streams_the_servers_answer(server, page):
    open_page(page, server)
    models = page.get_by_test_id("model-select").locator("option").all_text_contents()
    assert models == ["tiny (base)", f"{ADAPTER} (adapter, lora_smollm2)"]
    page.get_by_test_id("model-select").select_option(ADAPTER)
    greedy_settings(page)
    # Record every length the answer takes while it streams.
    page.evaluate(
        """() => {
          window.seen = [];
          new MutationObserver(() => {
            const t = document.querySelector('#chat-log li.assistant:last-child .text');
            if (t) window.seen.push(t.textContent.length);
          }).observe(document.getElementById('chat-log'), {subtree: true, childList: true, characterData: true});
        }"""
    )
    page.get_by_test_id("chat-input").fill(PROMPT)
    page.get_by_test_id("chat-send").click()
    answer = page.locator('[data-testid="assistant-message"][data-state="done"]')
    answer.wait_for()
    shot(page, "chat")
    text = answer.locator(".text").text_content()
    expected, usage = server_answer(server, ADAPTER)
    assert text == expected and text.strip(), (text, expected)
    seen = page.evaluate("window.seen")
    assert len({n for n in seen if 0 < n < len(text)}) >= 1, f"no partial answer was shown: {seen}"
    stats = answer.locator(".stats").text_content()
    assert f"{usage['prompt_tokens']} prompt + {usage['completion_tokens']} completion tokens" in stats
    assert "first token" in stats
    # History: the second turn sends the first question and answer too.
    page.get_by_test_id("chat-input").fill("and again")
    page.get_by_test_id("chat-send").click()
    page.locator('[data-testid="assistant-message"][data-state="done"]').nth(1).wait_for()
    assert page.locator('[data-testid="user-message"]').count() == 2


def test_the_stop_button_ends_a_running_answer(server, page):
    open_page(page, server)
    page.get_by_test_id("model-select").select_option(ADAPTER)
    page.get_by_test_id("max-tokens").fill("480")
    # Press Stop the moment the first piece shows (from inside the page: the tiny model is fast).
    page.evaluate(
        """() => new MutationObserver((_, observer) => {
          const t = document.querySelector('#chat-log li.assistant:last-child .text');
          if (t && t.textContent) { observer.disconnect(); document.getElementById('chat-stop').click(); }
        }).observe(document.getElementById('chat-log'), {subtree: true, childList: true, characterData: true})"""
    )
    page.get_by_test_id("chat-input").fill(PROMPT)
    page.get_by_test_id("chat-send").click()
    stopped = page.locator('[data-testid="assistant-message"][data-state="stopped"]')
    stopped.wait_for()
    assert "stopped" in stopped.locator(".stats").text_content()
    assert 0 < len(stopped.locator(".text").text_content()) < 480
    assert page.get_by_test_id("chat-send").is_enabled()


def test_an_adapter_scale_moved_and_applied_shows_in_lora_adapters(server, page):
    open_page(page, server)
    assert lora_state(server) == {ADAPTER: (0.0, False)}
    slider = page.get_by_test_id("adapter-scale-0")
    slider.focus()
    for _ in range(10):
        page.keyboard.press("ArrowRight")  # 10 steps of 0.05
    assert page.get_by_test_id("adapter-scale-value-0").text_content() == "0.50"
    page.get_by_test_id("adapters-apply").click()
    expect(page.get_by_test_id("adapters-state")).to_have_text(f"Active: {ADAPTER} × 0.5")
    assert lora_state(server) == {ADAPTER: (0.5, True)}
    expect(page.get_by_test_id("model-select").locator("option").first).to_have_text(f"tiny (base + {ADAPTER} × 0.5)")
    shot(page, "adapters")
    page.get_by_test_id("adapters-clear").click()
    expect(page.get_by_test_id("adapters-state")).to_have_text("Active: none (the base alone)")
    assert lora_state(server) == {ADAPTER: (0.0, False)}


def test_side_by_side_streams_both_answers_with_latency_and_token_counts(server, page):
    assert call(server, "/lora-adapters", method="POST", body=[])[0] == 200  # the base alone on the left
    open_page(page, server)
    greedy_settings(page)
    page.get_by_test_id("tab-compare").click()
    assert page.get_by_test_id("compare-left").input_value() == "tiny"
    assert page.get_by_test_id("compare-right").input_value() == ADAPTER
    page.get_by_test_id("compare-prompt").fill(PROMPT)
    page.get_by_test_id("compare-run").click()
    for side in ("left", "right"):
        page.locator(f'article:has([data-testid="compare-{side}-text"])[data-state="done"]').wait_for()
    shot(page, "side_by_side")
    for side, model in (("left", "tiny"), ("right", ADAPTER)):
        expected, usage = server_answer(server, model)
        assert page.get_by_test_id(f"compare-{side}-text").text_content() == expected
        stats = page.get_by_test_id(f"compare-{side}-stats").text_content()
        ttft, total = (int(x) for x in re.search(r"first token (\d+) ms · total (\d+) ms", stats).groups())
        assert 0 <= ttft <= total
        assert f"{usage['prompt_tokens']} prompt + {usage['completion_tokens']} completion tokens" in stats
    left = page.get_by_test_id("compare-left-text").text_content()
    right = page.get_by_test_id("compare-right-text").text_content()
    assert left != right  # the adapter changes the answer


def test_the_runs_view_lists_the_run_and_opens_its_report_and_loss_plot(server, page):
    open_page(page, server)
    page.get_by_test_id("tab-runs").click()
    row = page.locator(f'tr[data-testid="run-row"][data-run="{RUN_ID}"]')
    row.wait_for()
    cells = row.locator("td").all_text_contents()
    assert cells[1:4] == ["lora_smollm2", "2026-01-02 03:04:05", "ok"]
    assert "train.steps 30" in cells[4]
    row.locator('a[data-file="report.html"]').click()
    page.wait_for_selector('[data-testid="run-viewer"][data-state="done"]')
    heading = page.frame_locator('[data-testid="viewer-frame"]').locator("h1")
    expect(heading).to_have_text("Run report: lora_smollm2")
    page.wait_for_timeout(500)  # the frame's first paint, for the screenshot
    shot(page, "runs_report")
    row.locator('a[data-file="loss.png"]').click()
    page.wait_for_selector('[data-testid="run-viewer"][data-state="done"] [data-testid="viewer-image"]')
    expect(page.get_by_test_id("viewer-image")).not_to_have_js_property("naturalWidth", 0)  # the PNG decoded
    shot(page, "runs_loss_plot")


def test_with_the_api_key_on_the_page_asks_for_it_once_and_then_works(keyed_server, page):
    page.goto(keyed_server)
    form = page.get_by_test_id("key-form")
    form.wait_for()
    shot(page, "key_asked")
    page.get_by_test_id("key-input").fill("not-the-key")
    page.get_by_test_id("key-submit").click()
    expect(page.locator("#key-message")).to_contain_text("That key was refused")
    page.get_by_test_id("key-input").fill(KEY)
    page.get_by_test_id("key-submit").click()
    page.wait_for_selector("body[data-ready=true]")
    assert not form.is_visible()
    assert page.evaluate("sessionStorage.getItem('engine.apiKey')") == KEY
    page.get_by_test_id("model-select").select_option(ADAPTER)
    greedy_settings(page)
    page.get_by_test_id("chat-input").fill(PROMPT)
    page.get_by_test_id("chat-send").click()
    answer = page.locator('[data-testid="assistant-message"][data-state="done"]')
    answer.wait_for()
    assert answer.locator(".text").text_content() == server_answer(keyed_server, ADAPTER, key=KEY)[0]
    page.get_by_test_id("tab-runs").click()
    page.locator(f'tr[data-run="{RUN_ID}"] a[data-file="report.html"]').click()
    page.wait_for_selector('[data-testid="run-viewer"][data-state="done"]')
    assert not form.is_visible()  # asked once: every later call sent the key
    shot(page, "key_then_runs")
    page.reload()  # the key stays for this tab
    page.wait_for_selector("body[data-ready=true]")
    assert not form.is_visible()
