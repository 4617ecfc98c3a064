// vicuna's web chat page: plain JavaScript, no build step, no dependencies.
// Talks to the OpenAI-compatible API of the server that serves this page (relative URLs, so it
// also works behind a reverse proxy that puts everything under a prefix).
// Model text is only ever placed with textContent / createElement, never innerHTML: an answer that
// contains <script> or <img onerror=...> shows up as text.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const MODEL_STORAGE = "vicuna.model";
  const state = { history: [], controller: null };
  const { describe, httpError, sseEvents, renderContent, showError, clearError, headers, bindApiKey, bindComposer } =
    window.vicuna;

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
    bindApiKey(loadModels);
    $("model").addEventListener("change", () => localStorage.setItem(MODEL_STORAGE, $("model").value));
    $("reload-models").addEventListener("click", loadModels);
    $("new-chat").addEventListener("click", newChat);
    $("stop").addEventListener("click", () => state.controller && state.controller.abort());
    bindComposer(() => !state.controller, send);
    loadModels();
  }

  start();
})();
