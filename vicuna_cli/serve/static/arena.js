// The arena page: one prompt, two anonymous models answering side by side (one SSE stream from
// POST arena/api/battles), a vote, then the names. The server picks the pair and keeps the
// answers; the page only ever sends the prompt and the vote. Model text is set as text only
// (shared.js renderContent), never parsed as HTML.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const { describe, httpError, sseEvents, renderContent, showError, clearError, headers, bindApiKey, bindComposer } =
    window.vicuna;
  const state = { battle: null, busy: false, ready: false, controller: null };
  const LABELS = { model_a: "A is better", model_b: "B is better", tie: "a tie", "tie (bothbad)": "both are bad" };

  function side(name) {
    const el = $(`side-${name}`);
    return { el, name: el.querySelector(".name"), content: el.querySelector(".content"), meta: el.querySelector(".meta") };
  }

  function setBusy(busy) {
    state.busy = busy;
    $("send").disabled = busy || !state.ready;
    $("prompt").readOnly = busy;
  }

  function resetSides() {
    for (const s of ["a", "b"]) {
      const view = side(s);
      view.name.textContent = `Model ${s.toUpperCase()}`;
      view.content.replaceChildren();
      view.meta.textContent = "";
      view.el.classList.remove("winner", "streaming");
    }
    $("votes").hidden = true;
    $("result").hidden = true;
    $("result").textContent = "";
    state.battle = null;
  }

  async function loadStatus() {
    let res;
    try {
      res = await fetch("arena/api/status", { headers: headers(false) });
    } catch (e) {
      showError(`cannot reach the server: ${e.message}`);
      return;
    }
    if (!res.ok) {
      state.ready = false;
      setBusy(state.busy);
      showError(`checking the arena failed: ${await httpError(res)}`);
      return;
    }
    const body = await res.json();
    state.ready = body.ready === true;
    clearError();
    $("notice").hidden = state.ready;
    $("notice").textContent = state.ready ? "" :
      `The arena needs at least two served models; this server serves ${body.models}. Start it with two or more -m MODEL.`;
    $("status").textContent = `${body.models} model${body.models === 1 ? "" : "s"} in the arena`;
    setBusy(state.busy);
  }

  async function battle(prompt) {
    clearError();
    resetSides();
    const texts = { a: "", b: "" };
    const views = { a: side("a"), b: side("b") };
    views.a.el.classList.add("streaming");
    views.b.el.classList.add("streaming");
    const controller = new AbortController();
    state.controller = controller;
    setBusy(true);
    let failure = null;
    let complete = false;
    let battleId = null;
    try {
      const res = await fetch("arena/api/battles", {
        method: "POST", headers: headers(true), body: JSON.stringify({ prompt }), signal: controller.signal,
      });
      if (!res.ok) {
        failure = await httpError(res);
      } else {
        for await (const { data } of sseEvents(res.body)) {
          if (data === "[DONE]") break;
          let event;
          try {
            event = JSON.parse(data);
          } catch (e) {
            failure = `the server sent an event that is not JSON: ${data.slice(0, 200)}`;
            break;
          }
          if (event.error) {
            failure = `error while answering: ${describe(event)}`;
            break;
          }
          if (event.battle_id && !event.done) battleId = event.battle_id;
          if (event.side === "a" || event.side === "b") {
            if (event.text) {
              texts[event.side] += event.text;
              renderContent(views[event.side].content, texts[event.side]);
            }
            if (event.finish_reason) {
              views[event.side].el.classList.remove("streaming");
              views[event.side].meta.textContent = event.finish_reason === "length" ? "cut at max tokens" : "done";
            }
          }
          if (event.done) complete = true;
        }
        if (!failure && !complete && !controller.signal.aborted) failure = "the answers ended before they were complete";
      }
    } catch (e) {
      if (!controller.signal.aborted) failure = `network error: ${e.message}`;
    } finally {
      state.controller = null;
      views.a.el.classList.remove("streaming");
      views.b.el.classList.remove("streaming");
      setBusy(false);
    }
    if (failure) {
      showError(failure);
      if (!$("prompt").value) $("prompt").value = prompt;
      return;
    }
    if (complete) {
      state.battle = battleId;
      for (const button of $("votes").querySelectorAll("button")) button.disabled = false;
      $("votes").hidden = false;
    }
  }

  async function vote(choice) {
    if (!state.battle) return;
    const buttons = $("votes").querySelectorAll("button");
    for (const button of buttons) button.disabled = true;
    let res;
    try {
      res = await fetch(`arena/api/battles/${encodeURIComponent(state.battle)}/vote`, {
        method: "POST", headers: headers(true), body: JSON.stringify({ vote: choice }),
      });
    } catch (e) {
      showError(`network error: ${e.message}`);
      for (const button of buttons) button.disabled = false;
      return;
    }
    if (!res.ok) {
      showError(`the vote was not stored: ${await httpError(res)}`);
      // Too many requests: the same vote can be sent again later; any other refusal is final.
      if (res.status === 429) for (const button of buttons) button.disabled = false;
      return;
    }
    const body = await res.json();
    state.battle = null;
    clearError();
    side("a").name.textContent = `Model A: ${body.model_a}`;
    side("b").name.textContent = `Model B: ${body.model_b}`;
    if (body.winner === "model_a") side("a").el.classList.add("winner");
    if (body.winner === "model_b") side("b").el.classList.add("winner");
    $("votes").hidden = true;
    $("result").textContent = `Vote stored: ${LABELS[body.winner] || body.winner}. A was ${body.model_a}, B was ${body.model_b}.`;
    $("result").hidden = false;
  }

  function start() {
    bindApiKey(loadStatus); // the chat page's key: one key for the whole server
    for (const button of $("votes").querySelectorAll("button")) {
      button.addEventListener("click", () => vote(button.dataset.vote));
    }
    $("new-battle").addEventListener("click", () => {
      if (state.controller) state.controller.abort();
      clearError();
      resetSides();
      $("prompt").focus();
    });
    bindComposer(() => !state.busy && state.ready, battle);
    setBusy(false);
    loadStatus();
  }

  start();
})();
