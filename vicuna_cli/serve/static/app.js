// vicuna's web chat page: plain JavaScript, no build step, no dependencies.
// Talks to the OpenAI-compatible API of the server that serves this page (relative URLs, so it
// also works behind a reverse proxy that puts everything under a prefix).
// Model text is only ever placed with textContent / createElement, never innerHTML: an answer that
// contains <script> or <img onerror=...> shows up as text.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const KEY_STORAGE = "vicuna.apiKey";
  const MODEL_STORAGE = "vicuna.model";
  const state = { history: [], controller: null };

  // ---- errors -------------------------------------------------------------------------------

  function showError(message) {
    const box = $("error");
    box.textContent = message;
    box.hidden = false;
  }

  function clearError() {
    const box = $("error");
    box.textContent = "";
    box.hidden = true;
  }

  // The message inside an error body: OpenAI's {"error": {...}}, FastAPI's {"detail": ...},
  // or a plain {"message": ...} from other servers.
  function describe(body) {
    if (body === null || typeof body !== "object") return String(body);
    let err = body.error ?? body.detail ?? body.message;
    if (err && typeof err === "object" && err.error) err = err.error;
    if (typeof err === "string") return err;
    if (err && typeof err === "object") {
      const message = err.message || JSON.stringify(err);
      return err.code ? `${message} (${err.code})` : message;
    }
    return JSON.stringify(body);
  }

  async function httpError(res) {
    let text = "";
    try {
      text = await res.text();
    } catch (e) {
      /* the body is gone; the status still says what happened */
    }
    let message = text.trim() || "(no details)";
    try {
      message = describe(JSON.parse(text));
    } catch (e) {
      /* not JSON: show the text as it came */
    }
    let hint = "";
    if (res.status === 401) hint = " — enter a valid API key above";
    else if (res.status === 503) hint = " — no worker is serving this model right now";
    return `HTTP ${res.status}: ${message}${hint}`;
  }

  function headers(json) {
    const h = {};
    if (json) h["Content-Type"] = "application/json";
    const key = $("api-key").value.trim();
    if (key) h["Authorization"] = `Bearer ${key}`;
    return h;
  }

  // ---- models -------------------------------------------------------------------------------

  function option(value, label) {
    const o = document.createElement("option");
    o.value = value;
    o.textContent = label;
    return o;
  }

  async function loadModels() {
    const select = $("model");
    const wanted = select.value || localStorage.getItem(MODEL_STORAGE) || "";
    select.disabled = true;
    let res;
    try {
      res = await fetch("v1/models", { headers: headers(false) });
    } catch (e) {
      select.replaceChildren(option("", "(server unreachable)"));
      showError(`cannot reach the server: ${e.message}`);
      return;
    }
    if (!res.ok) {
      select.replaceChildren(option("", "(no models)"));
      showError(`listing models failed: ${await httpError(res)}`);
      return;
    }
    const body = await res.json();
    const ids = (body.data || []).map((m) => m.id).filter((id) => typeof id === "string");
    if (ids.length === 0) {
      select.replaceChildren(option("", "(no models)"));
      showError("the server lists no models: start a worker for one");
      return;
    }
    select.replaceChildren(...ids.map((id) => option(id, id)));
    select.value = ids.includes(wanted) ? wanted : ids[0];
    select.disabled = false;
    clearError();
    $("status").textContent = `${ids.length} model${ids.length === 1 ? "" : "s"} available`;
  }

  // ---- rendering ----------------------------------------------------------------------------

  // A small, safe subset of Markdown: fenced code blocks become <pre><code>; everything else is
  // shown as text with its line breaks (CSS white-space: pre-wrap). An unclosed fence (an answer
  // still streaming) runs to the end.
  const FENCE = /```([^\n`]*)\n?([\s\S]*?)(?:```|$)/g;

  function renderContent(el, text) {
    const nodes = [];
    let last = 0;
    for (const m of text.matchAll(FENCE)) {
      // The line breaks around a fence belong to the fence, not to the text beside it.
      const before = text.slice(last, m.index).replace(last ? /^\n|\n$/g : /\n$/, "");
      if (before) nodes.push(textBlock(before));
      const pre = document.createElement("pre");
      const code = document.createElement("code");
      const lang = m[1].trim();
      if (lang) code.dataset.lang = lang;
      code.textContent = m[2];
      pre.append(code);
      nodes.push(pre);
      last = m.index + m[0].length;
    }
    const rest = last ? text.slice(last).replace(/^\n/, "") : text;
    if (rest) nodes.push(textBlock(rest));
    el.replaceChildren(...nodes);
  }

  function textBlock(text) {
    const div = document.createElement("div");
    div.className = "text";
    div.textContent = text;
    return div;
  }

  function addMessage(role, text) {
    const msg = document.createElement("article");
    msg.className = `msg ${role}`;
    const who = document.createElement("div");
    who.className = "role";
    who.textContent = role === "user" ? "You" : $("model").value || "assistant";
    const content = document.createElement("div");
    content.className = "content";
    renderContent(content, text);
    const meta = document.createElement("div");
    meta.className = "meta";
    msg.append(who, content, meta);
    $("log").append(msg);
    scrollDown();
    return { msg, content, meta };
  }

  function scrollDown() {
    const log = $("log");
    log.scrollTop = log.scrollHeight;
  }

  function setBusy(busy) {
    $("send").hidden = busy;
    $("stop").hidden = !busy;
    $("prompt").readOnly = busy;
    $("model").disabled = busy || $("model").options.length === 0 || !$("model").value;
  }

  // ---- streaming ----------------------------------------------------------------------------

  // Server-sent events from a fetch body, per the HTML spec's parsing rules: lines end with CRLF,
  // LF or CR (sse-starlette sends CRLF), ":" lines are comments (keep-alive pings), an empty line
  // ends an event. Yields {event, data}. (EventSource itself cannot POST or send headers.)
  async function* sseEvents(body) {
    const reader = body.getReader();
    const decoder = new TextDecoder();
    const EOL = /\r\n|\n|\r/;
    const pending = { event: "message", data: [] };
    // One line of the stream; returns the event an empty line completes, else null.
    const feed = (line) => {
      if (line === "") {
        const done = pending.data.length ? { event: pending.event, data: pending.data.join("\n") } : null;
        pending.event = "message";
        pending.data = [];
        return done;
      }
      if (line.startsWith(":")) return null;
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      let value = colon < 0 ? "" : line.slice(colon + 1);
      if (value.startsWith(" ")) value = value.slice(1);
      if (field === "data") pending.data.push(value);
      else if (field === "event") pending.event = value;
      return null;
    };
    let buffer = "";
    try {
      for (;;) {
        const { value, done } = await reader.read();
        buffer += done ? decoder.decode() : decoder.decode(value, { stream: true });
        let m;
        while ((m = EOL.exec(buffer)) !== null) {
          // A CR at the very end may be the first half of a CRLF split across two reads.
          if (!done && m[0] === "\r" && m.index === buffer.length - 1) break;
          const line = buffer.slice(0, m.index);
          buffer = buffer.slice(m.index + m[0].length);
          const event = feed(line);
          if (event) yield event;
        }
        if (done) {
          // Lenient about a last event without its blank line: servers that close right after it.
          if (buffer) feed(buffer);
          const event = feed("");
          if (event) yield event;
          return;
        }
      }
    } finally {
      reader.cancel().catch(() => {});
    }
  }

  function requestBody(model) {
    const messages = [];
    const system = $("system").value.trim();
    if (system) messages.push({ role: "system", content: system });
    messages.push(...state.history);
    const body = { model, messages, stream: true, stream_options: { include_usage: true } };
    const temperature = parseFloat($("temperature").value);
    if (Number.isFinite(temperature)) body.temperature = temperature;
    const maxTokens = parseInt($("max-tokens").value, 10);
    if (Number.isFinite(maxTokens) && maxTokens > 0) body.max_tokens = maxTokens;
    return body;
  }

  async function send(text) {
    clearError();
    const model = $("model").value;
    if (!model) {
      showError("no model to talk to: the model list is empty (check the API key, then ↻)");
      return;
    }
    state.history.push({ role: "user", content: text });
    const userView = addMessage("user", text);
    const view = addMessage("assistant", "");
    view.msg.classList.add("streaming");
    const controller = new AbortController();
    state.controller = controller;
    setBusy(true);

    let answer = "";
    let usage = null;
    let finish = null;
    let failure = null;
    let sawDone = false;
    const started = performance.now();
    let firstAt = null;
    try {
      const res = await fetch("v1/chat/completions", {
        method: "POST",
        headers: headers(true),
        body: JSON.stringify(requestBody(model)),
        signal: controller.signal,
      });
      if (!res.ok) {
        failure = await httpError(res);
      } else {
        for await (const { event, data } of sseEvents(res.body)) {
          if (data === "[DONE]") {
            sawDone = true;
            break;
          }
          let chunk;
          try {
            chunk = JSON.parse(data);
          } catch (e) {
            failure = `the server sent an event that is not JSON: ${data.slice(0, 200)}`;
            break;
          }
          if (chunk.error || event === "error") {
            failure = `error while answering: ${describe(chunk)}`;
            break;
          }
          if (chunk.usage) usage = chunk.usage;
          const choice = (chunk.choices || [])[0];
          if (!choice) continue;
          const delta = choice.delta && choice.delta.content;
          if (delta) {
            if (firstAt === null) firstAt = performance.now();
            answer += delta;
            renderContent(view.content, answer);
            scrollDown();
          }
          if (choice.finish_reason) finish = choice.finish_reason;
        }
        if (!failure && !sawDone && !controller.signal.aborted) {
          failure = "the answer stream ended before it was complete (no [DONE])";
        }
      }
    } catch (e) {
      if (!controller.signal.aborted) failure = `network error: ${e.message}`;
    } finally {
      state.controller = null;
      view.msg.classList.remove("streaming");
      setBusy(false);
    }

    const stopped = controller.signal.aborted && !failure;
    if (failure) {
      // The failed turn is left on screen (dimmed) but not sent again as context.
      state.history.pop();
      userView.msg.classList.add("failed");
      view.msg.classList.add("failed");
      view.meta.textContent = "failed";
      showError(failure);
      if (!$("prompt").value) $("prompt").value = text;
      if (!answer) view.msg.remove();
      return;
    }
    state.history.push({ role: "assistant", content: answer });
    const parts = [];
    const tokens = usage ? usage.completion_tokens : null;
    if (tokens != null) parts.push(`${tokens} tokens`);
    if (firstAt !== null) {
      parts.push(`first token ${((firstAt - started) / 1000).toFixed(2)} s`);
      const seconds = (performance.now() - firstAt) / 1000;
      if (tokens > 1 && seconds > 0) parts.push(`${((tokens - 1) / seconds).toFixed(1)} tok/s`);
    }
    parts.push(stopped ? "stopped" : finish === "length" ? "cut at max tokens" : "done");
    view.meta.textContent = parts.join(" · ");
  }

  // ---- wiring -------------------------------------------------------------------------------

  function newChat() {
    if (state.controller) state.controller.abort();
    state.history = [];
    $("log").replaceChildren();
    clearError();
    $("prompt").focus();
  }

  function start() {
    const keyInput = $("api-key");
    keyInput.value = localStorage.getItem(KEY_STORAGE) || "";
    keyInput.addEventListener("change", () => {
      const key = keyInput.value.trim();
      if (key) localStorage.setItem(KEY_STORAGE, key);
      else localStorage.removeItem(KEY_STORAGE);
      loadModels();
    });
    $("model").addEventListener("change", () => localStorage.setItem(MODEL_STORAGE, $("model").value));
    $("reload-models").addEventListener("click", loadModels);
    $("new-chat").addEventListener("click", newChat);
    $("stop").addEventListener("click", () => state.controller && state.controller.abort());
    $("composer").addEventListener("submit", (e) => {
      e.preventDefault();
      if (state.controller) return;
      const text = $("prompt").value.trim();
      if (!text) return;
      $("prompt").value = "";
      send(text);
    });
    $("prompt").addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
        e.preventDefault();
        $("composer").requestSubmit();
      }
    });
    loadModels();
  }

  start();
})();
