// The page: pick one model or two, send the same prompt to each, stream both answers (server-sent events over a
// POST, read from fetch's body), with live figures. Model text is only ever set as textContent.
"use strict";

const $ = (id) => document.getElementById(id);
class Refused extends Error {} // the server said no before starting: the conversation is as it was
const state = { models: [], slots: {} };

function newId() {
  // Not crypto.randomUUID: it exists only in secure contexts, and a phone on the LAN reaches us over plain http.
  return Date.now().toString(36) + Math.random().toString(36).slice(2, 10);
}

function showError(element, message) {
  element.textContent = message || "";
  element.hidden = !message;
}

function fmtBytes(n) {
  if (n >= 1e9) return (n / 1e9).toFixed(2) + " GB";
  return n >= 1e6 ? (n / 1e6).toFixed(1) + " MB" : (n / 1e3).toFixed(1) + " kB";
}

function fmtFigures(f, done) {
  const parts = [];
  if (f.ttft_s != null) parts.push("first token " + f.ttft_s.toFixed(2) + " s");
  if (f.tokens != null) parts.push(f.tokens + " tokens");
  if (f.tokens_per_s != null) parts.push(f.tokens_per_s.toFixed(1) + " tokens/s");
  if (done && f.context_used != null) parts.push(f.context_used + " in context");
  return parts.join(" · ") || "…";
}

function fillPane(slot, info) {
  const pane = state.slots[slot].pane;
  pane.querySelector(".name").textContent = info.name;
  const method = info.quant_method && info.quant_method !== "none" ? " (" + info.quant_method + ")" : "";
  const shape = info.layers ? " · " + info.layers + " layers × " + info.d_model : "";
  pane.querySelector(".meta").textContent =
    fmtBytes(info.file_bytes) + " · " + info.quant + method + " · context " + info.context + shape +
    " · vocabulary " + info.vocab_size;
  const dl = pane.querySelector("dl");
  dl.replaceChildren();
  const versions = Object.entries(info.versions || {}).map(([k, v]) => k + " " + v).join(", ");
  for (const [key, value] of [["source", info.source], ["config hash", info.config_hash], ["tools", versions]]) {
    const dt = document.createElement("dt"), dd = document.createElement("dd");
    dt.textContent = key;
    dd.textContent = value || "—";
    dl.append(dt, dd);
  }
}

function layout() {
  const panes = $("panes");
  panes.replaceChildren();
  for (const slot of ["a", "b"]) {
    const name = $("model-" + slot).value;
    const entry = state.slots[slot];
    entry.model = name;
    entry.conversation = newId();
    if (!name) continue;
    const pane = $("pane").content.firstElementChild.cloneNode(true);
    pane.dataset.slot = slot;
    entry.pane = pane;
    panes.append(pane);
    fillPane(slot, state.models.find((m) => m.name === name));
  }
  panes.classList.toggle("two", panes.children.length === 2);
}

function settings() {
  const num = (id) => ($(id).value === "" ? null : Number($(id).value));
  return { max_new_tokens: num("max-new-tokens"), temperature: num("temperature"), top_k: num("top-k"),
           top_p: num("top-p") };
}

async function stream(slot, prompt, controller) {
  const entry = state.slots[slot], pane = entry.pane;
  const stats = pane.querySelector(".stats"), error = pane.querySelector(".error");
  const turn = document.createElement("div"), asked = document.createElement("span");
  const answer = document.createElement("span");
  turn.className = "turn";
  asked.className = "prompt";
  answer.className = "answer streaming";
  answer.dataset.chunks = "0";
  asked.textContent = prompt;
  turn.append(asked, answer);
  pane.querySelector(".transcript").append(turn);
  showError(error, "");
  stats.textContent = "waiting for the engine…";
  try {
    const response = await fetch("/api/generate", {
      method: "POST", headers: { "Content-Type": "application/json" }, signal: controller.signal,
      body: JSON.stringify({ model: entry.model, conversation: entry.conversation, prompt, ...settings() }),
    });
    if (!response.ok) {
      const body = await response.json().catch(() => ({ error: response.status + " " + response.statusText }));
      throw new Refused(body.error);
    }
    const reader = response.body.getReader(), decoder = new TextDecoder();
    let buffer = "", finished = false;
    while (!finished) {
      const { value, done } = await reader.read();
      if (done) throw new Error("the server closed the stream before the answer ended");
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const line = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        if (!line.startsWith("data: ")) continue;
        const event = JSON.parse(line.slice(6));
        if (event.type === "start") stats.textContent = "prefilling…";
        else if (event.type === "text") {
          answer.textContent += event.text;
          answer.dataset.chunks = String(Number(answer.dataset.chunks) + 1);
          stats.textContent = fmtFigures(event, false);
        } else if (event.type === "done") {
          stats.textContent = fmtFigures(event, true);
          finished = true;
        }
        else if (event.type === "error") throw new Error(event.message);
      }
    }
  } catch (e) {
    if (e.name === "AbortError") stats.textContent += " · stopped";
    else {
      stats.textContent = "no answer";
      showError(error, e.message || String(e));
    }
    // Stopped or failed mid-answer, the server has dropped the conversation: the next prompt starts a new one.
    if (!(e instanceof Refused)) entry.conversation = newId();
  } finally {
    answer.classList.remove("streaming");
    pane.dataset.state = "idle";
  }
}

async function send(event) {
  event.preventDefault();
  const prompt = $("prompt").value;
  if (!prompt) return;
  const controller = new AbortController();
  state.controller = controller;
  $("send").disabled = true;
  $("stop").disabled = false;
  const slots = ["a", "b"].filter((s) => state.slots[s].model);
  for (const s of slots) state.slots[s].pane.dataset.state = "busy";
  await Promise.all(slots.map((s) => stream(s, prompt, controller)));
  $("send").disabled = false;
  $("stop").disabled = true;
}

async function start() {
  state.slots = { a: {}, b: {} };
  try {
    const response = await fetch("/api/models");
    if (!response.ok) throw new Error("the server answered " + response.status);
    state.models = await response.json();
  } catch (e) {
    showError($("error"), "cannot list the models: " + e.message);
    return;
  }
  for (const [i, m] of state.models.entries()) {
    for (const slot of ["a", "b"]) {
      const option = document.createElement("option");
      option.value = option.textContent = m.name;
      $("model-" + slot).append(option);
    }
    if (i === 1) $("model-b").value = m.name;
  }
  layout();
  $("ask").addEventListener("submit", send);
  $("stop").addEventListener("click", () => state.controller && state.controller.abort());
  $("new").addEventListener("click", layout);
  for (const id of ["model-a", "model-b"]) $(id).addEventListener("change", layout);
  for (const id of ["max-new-tokens", "temperature", "top-k", "top-p"]) {
    $(id).addEventListener("change", () => {
      for (const s of ["a", "b"]) state.slots[s].conversation = newId();
    });
  }
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) $("ask").requestSubmit();
  });
  document.body.dataset.ready = "true";
}

start();
