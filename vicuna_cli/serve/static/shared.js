// What the chat page (app.js) and the arena page (arena.js) share: error messages from an HTTP
// reply, server-sent events read from a fetch body, the safe rendering of model text, the error
// box, the API key (stored, sent as a bearer token) and the prompt box's send-on-Enter form.
// Plain JavaScript, no build step. Model text is only ever placed with textContent /
// createElement, never innerHTML: an answer that contains <script> or <img onerror=...> shows up
// as text.
"use strict";

window.vicuna = (() => {
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

  // The page elements both pages have: #error (one message box), #api-key (stored in
  // localStorage under one name, so the chat and arena pages use the same key), #composer/#prompt.
  const $ = (id) => document.getElementById(id);
  const KEY_STORAGE = "vicuna.apiKey";

  function showError(message) {
    $("error").textContent = message;
    $("error").hidden = false;
  }

  function clearError() {
    $("error").textContent = "";
    $("error").hidden = true;
  }

  function headers(json) {
    const h = {};
    if (json) h["Content-Type"] = "application/json";
    const key = $("api-key").value.trim();
    if (key) h["Authorization"] = `Bearer ${key}`;
    return h;
  }

  // Fill the key box from storage; an edited key is stored (an empty one forgotten), then changed().
  function bindApiKey(changed) {
    const keyInput = $("api-key");
    keyInput.value = localStorage.getItem(KEY_STORAGE) || "";
    keyInput.addEventListener("change", () => {
      const key = keyInput.value.trim();
      if (key) localStorage.setItem(KEY_STORAGE, key);
      else localStorage.removeItem(KEY_STORAGE);
      changed();
    });
  }

  // The composer form both pages have (#composer, #prompt): Enter sends, Shift+Enter breaks the
  // line; a non-blank prompt goes to send(text) and the box empties, unless canSend() says no.
  function bindComposer(canSend, send) {
    $("composer").addEventListener("submit", (e) => {
      e.preventDefault();
      if (!canSend()) return;
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
  }

  return { describe, httpError, sseEvents, renderContent, showError, clearError, headers, bindApiKey, bindComposer };
})();
