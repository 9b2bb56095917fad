// engine playground: plain JS over the server's public API (no framework, nothing fetched
// from elsewhere). Every call goes through api(), which adds the API key once one is known
// and asks for it when the server answers 401. Model output is only ever set as textContent.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const KEY = "engine.apiKey";

  // --- API key and calls ----------------------------------------------------------

  class ApiFailure extends Error {
    constructor(error, status) {
      super((error && error.message) || `HTTP ${status}`);
      this.status = status;
      this.code = error && error.code;
    }
  }

  let keyPrompt = null; // one pending prompt shared by every call that met a 401

  function askKey(message) {
    if (!keyPrompt) {
      keyPrompt = new Promise((resolve) => {
        $("key-message").textContent = message;
        $("key-panel").hidden = false;
        $("key-input").value = "";
        $("key-input").focus();
        const form = $("key-form");
        const submit = (event) => {
          event.preventDefault();
          const key = $("key-input").value.trim();
          if (!key) return;
          sessionStorage.setItem(KEY, key);
          form.removeEventListener("submit", submit);
          $("key-panel").hidden = true;
          keyPrompt = null;
          resolve();
        };
        form.addEventListener("submit", submit);
      });
    }
    return keyPrompt;
  }

  async function errorOf(res) {
    try {
      const body = await res.json();
      return body.error || body;
    } catch {
      return { message: `HTTP ${res.status} ${res.statusText}` };
    }
  }

  // fetch with the key; on 401 ask for a key (once for all waiting calls) and retry.
  async function api(path, { method = "GET", body, signal, raw = false } = {}) {
    for (;;) {
      const key = sessionStorage.getItem(KEY);
      const headers = key ? { Authorization: `Bearer ${key}` } : {};
      if (body !== undefined) headers["Content-Type"] = "application/json";
      const res = await fetch(path, {
        method,
        headers,
        body: body === undefined ? undefined : JSON.stringify(body),
        signal,
      });
      if (res.status === 401) {
        const error = await errorOf(res);
        if (sessionStorage.getItem(KEY) !== key) continue; // another call got a new key meanwhile
        sessionStorage.removeItem(KEY);
        await askKey(key ? `That key was refused: ${error.message} Enter the right one.` : "This server needs an API key.");
        continue;
      }
      if (!res.ok) throw new ApiFailure(await errorOf(res), res.status);
      return raw ? res : res.json();
    }
  }

  // POST a chat with stream=true and read the SSE lines up to [DONE]. Returns the text, the
  // usage chunk, time to first token and total time (ms); a stopped stream keeps its text.
  async function streamChat(body, { signal, onText }) {
    const t0 = performance.now();
    const out = { text: "", usage: null, ttft: null, total: null, finish: null, stopped: false };
    try {
      const res = await api("/v1/chat/completions", {
        method: "POST",
        body: { ...body, stream: true, stream_options: { include_usage: true } },
        signal,
        raw: true,
      });
      const reader = res.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      reading: for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        let end;
        while ((end = buffer.indexOf("\n")) >= 0) {
          const line = buffer.slice(0, end).replace(/\r$/, "");
          buffer = buffer.slice(end + 1);
          if (!line.startsWith("data:")) continue;
          const data = line.slice(5).trim();
          if (data === "[DONE]") {
            reader.cancel().catch(() => {});
            break reading;
          }
          const chunk = JSON.parse(data);
          if (chunk.error) throw new ApiFailure(chunk.error, 0);
          if (chunk.usage) out.usage = chunk.usage;
          for (const choice of chunk.choices || []) {
            const piece = choice.delta ? choice.delta.content : choice.text;
            if (piece) {
              if (out.ttft === null) out.ttft = performance.now() - t0;
              out.text += piece;
              onText(out.text);
            }
            if (choice.finish_reason) out.finish = choice.finish_reason;
          }
        }
      }
    } catch (e) {
      if (e.name !== "AbortError") throw e;
      out.stopped = true;
    }
    out.total = performance.now() - t0;
    return out;
  }

  function settings() {
    const body = {
      temperature: Number($("temperature").value),
      top_p: Number($("top-p").value),
    };
    const max = parseInt($("max-tokens").value, 10);
    if (max >= 1) body.max_tokens = max;
    return body;
  }

  function withSystem(messages) {
    const system = $("system-prompt").value.trim();
    return system ? [{ role: "system", content: system }, ...messages] : messages;
  }

  function statsText(r) {
    const parts = [];
    if (r.ttft !== null) parts.push(`first token ${Math.round(r.ttft)} ms`);
    parts.push(`total ${Math.round(r.total)} ms`);
    if (r.usage) {
      parts.push(`${r.usage.prompt_tokens} prompt + ${r.usage.completion_tokens} completion tokens`);
      const gen = (r.total - (r.ttft || 0)) / 1000;
      if (r.usage.completion_tokens > 1 && gen > 0) parts.push(`${((r.usage.completion_tokens - 1) / gen).toFixed(1)} tokens/s`);
    }
    if (r.stopped) parts.push("stopped");
    else if (r.finish === "length") parts.push("cut at max tokens");
    return parts.join(" · ");
  }

  // --- server, models, adapters ----------------------------------------------------

  let models = []; // /v1/models data: the base first, then the adapters

  async function loadHealth() {
    try {
      const res = await fetch("/health");
      const h = await res.json();
      $("server-status").textContent = `Serving ${h.model}`;
    } catch {
      $("server-status").textContent = "The server does not answer.";
    }
  }

  function modelLabel(m) {
    if (m.kind === "adapter") return `${m.id} (adapter${m.recipe ? `, ${m.recipe}` : ""})`;
    const active = m.active_adapters || [];
    if (!active.length) return `${m.id} (base)`;
    return `${m.id} (base + ${active.map((a) => `${a.name} × ${a.scale}`).join(" + ")})`;
  }

  function fillSelect(select, fallback) {
    const keep = select.value;
    select.replaceChildren(
      ...models.map((m) => {
        const option = document.createElement("option");
        option.value = m.id;
        option.textContent = modelLabel(m);
        return option;
      }),
    );
    const ids = models.map((m) => m.id);
    select.value = ids.includes(keep) ? keep : ids.includes(fallback) ? fallback : ids[0] || "";
  }

  async function loadModels() {
    const list = await api("/v1/models");
    models = list.data;
    const base = models[0] ? models[0].id : "";
    const firstAdapter = (models.find((m) => m.kind === "adapter") || {}).id || base;
    fillSelect($("model-select"), base);
    fillSelect($("compare-left"), base);
    fillSelect($("compare-right"), firstAdapter);
  }

  function showAdapterState(list) {
    const active = list.filter((a) => a.active);
    $("adapters-state").textContent = active.length
      ? `Active: ${active.map((a) => `${a.name} × ${a.scale}`).join(" + ")}`
      : "Active: none (the base alone)";
  }

  async function loadAdapters() {
    const list = await api("/lora-adapters");
    const box = $("adapter-sliders");
    if (!list.length) {
      box.innerHTML = '<p class="hint">No adapters loaded.</p>';
    } else {
      box.replaceChildren(
        ...list.map((a, i) => {
          const wrap = document.createElement("div");
          wrap.className = "slider";
          const label = document.createElement("label");
          label.htmlFor = `adapter-scale-${i}`;
          label.textContent = a.name + (a.recipe ? ` (${a.recipe})` : "");
          const input = document.createElement("input");
          Object.assign(input, { type: "range", min: "0", max: "2", step: "0.05", id: `adapter-scale-${i}` });
          input.value = String(a.scale);
          input.dataset.adapter = a.name;
          input.dataset.testid = `adapter-scale-${i}`;
          const value = document.createElement("output");
          value.htmlFor = input.id;
          value.dataset.testid = `adapter-scale-value-${i}`;
          value.textContent = Number(a.scale).toFixed(2);
          input.addEventListener("input", () => (value.textContent = Number(input.value).toFixed(2)));
          wrap.append(label, input, value);
          return wrap;
        }),
      );
    }
    showAdapterState(list);
    return list;
  }

  async function setAdapters(body) {
    const state = $("adapters-state");
    state.textContent = "Applying…";
    try {
      await api("/lora-adapters", { method: "POST", body });
      await loadAdapters(); // shows what the server now holds, not what was asked
      await loadModels();
    } catch (e) {
      state.textContent = `Not applied: ${e.message}`;
    }
  }

  $("adapters-apply").addEventListener("click", () => {
    const chosen = [...document.querySelectorAll("#adapter-sliders input[type=range]")]
      .filter((s) => Number(s.value) > 0)
      .map((s) => ({ name: s.dataset.adapter, scale: Number(s.value) }));
    setAdapters({ adapters: chosen });
  });
  $("adapters-clear").addEventListener("click", () => setAdapters([]));

  for (const [input, output] of [
    ["temperature", "temperature-value"],
    ["top-p", "top-p-value"],
  ]) {
    $(input).addEventListener("input", () => ($(output).textContent = $(input).value));
  }

  // --- chat ------------------------------------------------------------------------

  let history = [];
  let chatAbort = null;

  function addMessage(role, text) {
    const item = document.createElement("li");
    item.className = `msg ${role}`;
    item.dataset.testid = `${role}-message`;
    const who = document.createElement("span");
    who.className = "who";
    who.textContent = role === "user" ? "You" : "Model";
    const body = document.createElement("div");
    body.className = "text";
    body.textContent = text;
    const stats = document.createElement("p");
    stats.className = "stats";
    item.append(who, body, stats);
    $("chat-log").append(item);
    item.scrollIntoView({ block: "end" });
    return item;
  }

  async function sendChat(event) {
    event.preventDefault();
    const text = $("chat-input").value.trim();
    if (!text || chatAbort) return;
    $("chat-error").textContent = "";
    $("chat-input").value = "";
    history.push({ role: "user", content: text });
    addMessage("user", text);
    const item = addMessage("assistant", "");
    item.dataset.state = "streaming";
    chatAbort = new AbortController();
    $("chat-send").disabled = true;
    $("chat-stop").disabled = false;
    try {
      const body = { model: $("model-select").value, messages: withSystem(history), ...settings() };
      const r = await streamChat(body, {
        signal: chatAbort.signal,
        onText: (t) => (item.querySelector(".text").textContent = t),
      });
      history.push({ role: "assistant", content: r.text });
      item.querySelector(".stats").textContent = statsText(r);
      item.dataset.state = r.stopped ? "stopped" : "done";
    } catch (e) {
      history.pop(); // the question goes unanswered: not part of the conversation
      item.dataset.state = "error";
      item.querySelector(".text").textContent = "(no answer)";
      $("chat-error").textContent = e.message;
    } finally {
      chatAbort = null;
      $("chat-send").disabled = false;
      $("chat-stop").disabled = true;
    }
  }

  $("chat-form").addEventListener("submit", sendChat);
  $("chat-input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) {
      e.preventDefault();
      $("chat-form").requestSubmit();
    }
  });
  $("chat-stop").addEventListener("click", () => chatAbort && chatAbort.abort());
  $("chat-reset").addEventListener("click", () => {
    if (chatAbort) chatAbort.abort();
    history = [];
    $("chat-log").replaceChildren();
    $("chat-error").textContent = "";
  });

  // --- side by side ----------------------------------------------------------------

  let compareAbort = null;

  async function runSide(side, prompt, signal) {
    const select = $(`compare-${side}`);
    const text = $(`compare-${side}-text`);
    const stats = $(`compare-${side}-stats`);
    const card = text.closest("article");
    $(`compare-${side}-title`).textContent = select.options[select.selectedIndex]?.textContent || select.value;
    text.textContent = "";
    stats.textContent = "waiting…";
    card.dataset.state = "streaming";
    const body = { model: select.value, messages: withSystem([{ role: "user", content: prompt }]), ...settings() };
    try {
      const r = await streamChat(body, { signal, onText: (t) => (text.textContent = t) });
      stats.textContent = statsText(r);
      card.dataset.state = r.stopped ? "stopped" : "done";
    } catch (e) {
      stats.textContent = "";
      card.dataset.state = "error";
      $("compare-error").textContent = `${side}: ${e.message}`;
    }
  }

  $("compare-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const prompt = $("compare-prompt").value.trim();
    if (!prompt || compareAbort) return;
    $("compare-error").textContent = "";
    compareAbort = new AbortController();
    $("compare-run").disabled = true;
    $("compare-stop").disabled = false;
    for (const side of ["left", "right"]) $(`compare-${side}-text`).closest("article").dataset.state = "waiting";
    try {
      // One after the other: the server computes one answer at a time, so running both at
      // once would count the queue wait in the second answer's latency.
      await runSide("left", prompt, compareAbort.signal);
      if (!compareAbort.signal.aborted) await runSide("right", prompt, compareAbort.signal);
    } finally {
      compareAbort = null;
      $("compare-run").disabled = false;
      $("compare-stop").disabled = true;
    }
  });
  $("compare-stop").addEventListener("click", () => compareAbort && compareAbort.abort());

  // --- runs ------------------------------------------------------------------------

  const fileUrl = (id, name) => `/ui/runs/${id.split("/").map(encodeURIComponent).join("/")}/${name}`;

  function fmt(x) {
    if (x === null || x === undefined) return "";
    if (Number.isInteger(x)) return String(x);
    return Math.abs(x) >= 100 ? x.toFixed(1) : x.toPrecision(4).replace(/\.?0+$/, "");
  }

  function cell(row, content) {
    const td = document.createElement("td");
    if (content instanceof Node) td.append(content);
    else td.textContent = content ?? "";
    row.append(td);
    return td;
  }

  async function loadRuns() {
    $("runs-error").textContent = "";
    let list;
    try {
      list = await api("/ui/runs");
    } catch (e) {
      $("runs-error").textContent = e.message;
      return;
    }
    const note = [];
    note.push(list.outputs ? `${list.data.length} under ${list.outputs}/` : "This server was started without an outputs dir.");
    if (list.skipped) note.push(`${list.skipped} left out: they lead outside the outputs dir`);
    $("runs-note").textContent = note.join(" · ");
    $("runs-body").replaceChildren(
      ...list.data.map((run) => {
        const row = document.createElement("tr");
        row.dataset.testid = "run-row";
        row.dataset.run = run.id;
        cell(row, run.kind === "sweep" ? `${run.id} (sweep)` : run.id);
        cell(row, run.recipe);
        cell(row, run.time);
        cell(row, run.status);
        const metrics = document.createElement("ul");
        metrics.className = "metrics";
        for (const m of run.metrics) {
          const li = document.createElement("li");
          li.textContent = `${m.name} ${fmt(m.value)}${m.base !== null ? ` (${fmt(m.base)})` : ""}`;
          metrics.append(li);
        }
        cell(row, metrics);
        const files = document.createElement("ul");
        files.className = "files";
        for (const name of run.files) {
          const li = document.createElement("li");
          const a = document.createElement("a");
          a.href = fileUrl(run.id, name);
          a.textContent = name;
          a.dataset.testid = "run-file";
          a.dataset.run = run.id;
          a.dataset.file = name;
          a.addEventListener("click", (e) => {
            if (e.ctrlKey || e.metaKey || e.shiftKey) return; // a new tab works without a key only
            e.preventDefault();
            openFile(run.id, name);
          });
          li.append(a);
          files.append(li);
        }
        cell(row, files);
        return row;
      }),
    );
  }

  let viewerUrl = null;

  // Fetched with the key and shown here: a plain link cannot carry the Authorization header.
  async function openFile(id, name) {
    const viewer = $("run-viewer");
    const body = $("viewer-body");
    $("viewer-title").textContent = `${id} — ${name}`;
    viewer.hidden = false;
    viewer.dataset.state = "loading";
    body.replaceChildren();
    if (viewerUrl) URL.revokeObjectURL(viewerUrl);
    viewerUrl = null;
    try {
      const res = await api(fileUrl(id, name), { raw: true });
      if (name.endsWith(".html")) {
        const frame = document.createElement("iframe");
        frame.setAttribute("sandbox", ""); // no scripts, no same-origin access: a document to read
        frame.title = `${name} of ${id}`;
        frame.dataset.testid = "viewer-frame";
        // Relative links (a summary's plot) resolve against the file's own URL.
        const base = `<base href="${fileUrl(id, "")}">`;
        const html = await res.text();
        frame.srcdoc = /<head[^>]*>/i.test(html) ? html.replace(/<head[^>]*>/i, (m) => m + base) : base + html;
        body.append(frame);
      } else if (name.endsWith(".png")) {
        viewerUrl = URL.createObjectURL(await res.blob());
        const img = document.createElement("img");
        img.src = viewerUrl;
        img.alt = `${name} of run ${id}`;
        img.dataset.testid = "viewer-image";
        body.append(img);
      } else {
        const pre = document.createElement("pre");
        pre.textContent = await res.text();
        pre.dataset.testid = "viewer-text";
        body.append(pre);
      }
      viewer.dataset.state = "done";
      viewer.scrollIntoView({ block: "start" });
    } catch (e) {
      viewer.dataset.state = "error";
      body.textContent = e.message;
    }
  }

  $("runs-refresh").addEventListener("click", loadRuns);
  $("viewer-close").addEventListener("click", () => ($("run-viewer").hidden = true));

  // --- tabs ------------------------------------------------------------------------

  const tabs = [...document.querySelectorAll('[role="tab"]')];
  let runsLoaded = false;

  function select(tab) {
    for (const t of tabs) {
      const on = t === tab;
      t.setAttribute("aria-selected", String(on));
      t.tabIndex = on ? 0 : -1;
      $(t.getAttribute("aria-controls")).hidden = !on;
    }
    if (tab.id === "tab-runs" && !runsLoaded) {
      runsLoaded = true;
      loadRuns();
    }
  }

  tabs.forEach((tab, i) => {
    tab.addEventListener("click", () => select(tab));
    tab.addEventListener("keydown", (e) => {
      const step = e.key === "ArrowRight" ? 1 : e.key === "ArrowLeft" ? -1 : 0;
      if (!step) return;
      const next = tabs[(i + step + tabs.length) % tabs.length];
      next.focus();
      select(next);
    });
  });
  select(tabs[0]);

  // --- start -----------------------------------------------------------------------

  async function start() {
    await loadHealth();
    try {
      await loadModels();
      await loadAdapters();
      document.body.dataset.ready = "true";
    } catch (e) {
      $("server-status").textContent = `Could not load the models: ${e.message}`;
    }
  }

  start();
})();
