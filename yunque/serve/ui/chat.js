// The chat playground: streams /v1/chat/completions (fetch + server-sent events). Model output is
// put into the page with textContent only, so an answer holding HTML stays text.

import { APIError, call, describe, el } from "./api.js";

const $ = (id) => document.getElementById(id);
let history = []; // {role, content} of the conversation, without the system prompt
let running = null; // the AbortController of the answer being streamed
let modelId = null;
let epoch = 0; // bumped by Clear: an answer still arriving for a cleared conversation is dropped

export function setModel(id) {
  modelId = id;
}

function number(id, fallback) {
  const raw = $(id).value.trim();
  const v = Number(raw);
  return raw !== "" && Number.isFinite(v) ? v : fallback;
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
  $("regenerate").disabled = busy || history.length === 0;
  $("clear").disabled = busy;
}

function bubble(role, text) {
  const body = el("div", { class: "text" });
  body.textContent = text;
  const li = el("li", { class: "msg " + role }, el("span", { class: "role" }, role === "user" ? "You" : "Model"), body);
  $("messages").append(li);
  return li;
}

function scrollDown() {
  const last = $("messages").lastElementChild;
  if (last) last.scrollIntoView({ block: "end" });
}

async function copy(text, button) {
  try {
    await navigator.clipboard.writeText(text);
  } catch (_) {
    // not a secure context (http on another host): select-and-copy fallback
    const t = el("textarea", { class: "offscreen", "aria-hidden": "true" });
    t.value = text;
    document.body.append(t);
    t.select();
    document.execCommand("copy");
    t.remove();
  }
  button.textContent = "Copied";
  setTimeout(() => (button.textContent = "Copy"), 1500);
}

function finishBubble(li, text, stats) {
  const copyBtn = el("button", { type: "button", class: "small copy" }, "Copy");
  copyBtn.addEventListener("click", () => copy(text, copyBtn));
  li.append(el("div", { class: "meta" }, el("span", { class: "stats" }, stats), copyBtn));
}

// Reads the SSE body: calls onDelta(text) per content delta; resolves to the usage (or null).
async function readStream(response, onDelta) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  let usage = null;
  let done = false;
  while (!done) {
    const { value, done: end } = await reader.read();
    if (end) break;
    buf += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const event = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") {
          done = true;
          break;
        }
        const obj = JSON.parse(data);
        if (obj.error) throw new APIError(200, obj.error.code, obj.error.message, null);
        if (obj.usage) usage = obj.usage;
        const delta = obj.choices && obj.choices[0] && obj.choices[0].delta;
        if (delta && delta.content) onDelta(delta.content);
      }
    }
  }
  return usage;
}

async function answer() {
  $("chat-error").textContent = "";
  const system = $("system").value.trim();
  const messages = (system ? [{ role: "system", content: system }] : []).concat(history);
  const body = {
    model: modelId,
    messages,
    stream: true,
    stream_options: { include_usage: true },
    temperature: number("temperature", 0.7),
    top_p: number("top-p", 1),
    max_tokens: Math.max(1, Math.round(number("max-tokens", 128))),
  };
  const mine = epoch;
  running = new AbortController();
  setBusy(true);
  const li = bubble("assistant", "");
  li.classList.add("streaming");
  const out = li.querySelector(".text");
  scrollDown();
  let text = "";
  let chunks = 0;
  const t0 = performance.now();
  let tFirst = null;
  let tLast = null;
  let usage = null;
  let stopped = false;
  let failed = false;
  try {
    const r = await call("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
      signal: running.signal,
    });
    usage = await readStream(r, (delta) => {
      tLast = performance.now();
      if (tFirst === null) tFirst = tLast;
      chunks += 1;
      text += delta;
      out.textContent = text;
      scrollDown();
    });
  } catch (err) {
    if (err && err.name === "AbortError") stopped = true;
    else {
      failed = true;
      if (!text) li.remove();
      else li.classList.add("failed");
      $("chat-error").textContent = describe(err);
    }
  } finally {
    running = null;
    li.classList.remove("streaming");
  }
  if (mine !== epoch) return true;
  if (!text && stopped) li.remove();
  if (text || (!failed && !stopped)) {
    if (!text) li.classList.add("empty");
    history.push({ role: "assistant", content: text });
    const tokens = usage ? usage.completion_tokens : chunks;
    const parts = [`${tokens} token${tokens === 1 ? "" : "s"}${usage ? "" : " (about)"}`];
    if (tFirst !== null && tLast > tFirst && tokens > 1) parts.push(`${((tokens - 1) / ((tLast - tFirst) / 1000)).toFixed(1)} tok/s`);
    if (tFirst !== null) parts.push(`first token after ${((tFirst - t0) / 1000).toFixed(2)} s`);
    if (stopped) parts.push("stopped");
    li.dataset.tokens = String(tokens);
    finishBubble(li, text, parts.join(" · "));
  }
  setBusy(false);
  return !failed || Boolean(text);
}

async function send() {
  const prompt = $("prompt");
  const text = prompt.value;
  if (!text.trim() || running) return;
  history.push({ role: "user", content: text });
  const li = bubble("user", text);
  prompt.value = "";
  if (!(await answer())) {
    // refused (401, 429, too long, guard...): the message leaves the conversation and goes back
    // into the box, so that it neither poisons the next request nor is lost
    history.pop();
    li.remove();
    if (!prompt.value) prompt.value = text;
    setBusy(false);
  }
}

function regenerate() {
  if (running || history.length === 0) return;
  if (history[history.length - 1].role === "assistant") {
    history.pop();
    const items = $("messages").querySelectorAll("li.msg.assistant");
    if (items.length) items[items.length - 1].remove();
  }
  answer();
}

export function clearChat() {
  epoch += 1;
  if (running) running.abort();
  history = [];
  $("messages").replaceChildren();
  $("chat-error").textContent = "";
  setBusy(false);
}

export function initChat() {
  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    send();
  });
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      send();
    }
  });
  $("stop").addEventListener("click", () => running && running.abort());
  $("regenerate").addEventListener("click", regenerate);
  $("clear").addEventListener("click", clearChat);
  setBusy(false);
}
