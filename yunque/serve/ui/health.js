// Server health, polled every 2 s while the view is open: engine, queue, batch, tokens/s (from the
// server's token counter between two polls) and the signed-in key's rate-limit buckets.

import { describe, el, fmtNum, getJSON } from "./api.js";

const $ = (id) => document.getElementById(id);
let timer = null;
let last = null; // {t, tokens} of the previous poll

function show(s) {
  const dl = $("health-facts");
  const rows = [];
  const add = (k, v, field) => rows.push(el("dt", {}, k), el("dd", { "data-field": field }, String(v)));
  const now = performance.now();
  let rate = "-";
  if (last !== null && now > last.t) rate = ((s.completion_tokens - last.tokens) / ((now - last.t) / 1000)).toFixed(1);
  last = { t: now, tokens: s.completion_tokens };
  const e = s.engine;
  add("Engine", e.status + (e.ready && e.ready !== "ready" ? ` (${e.ready})` : "") + (e.engine_restarts ? ` (${e.engine_restarts} restarts)` : "") + (e.error ? ": " + e.error : ""), "engine");
  add("Queue depth", `${s.queue_depth} waiting (at most ${s.max_queue})`, "queue");
  add("Running sequences", `${s.running} of ${s.max_batch} batch rows`, "running");
  add("Tokens/s (generated, since the last poll)", rate, "rate");
  add("Tokens generated", fmtNum(s.completion_tokens), "generated");
  add("Prompt tokens", fmtNum(s.prompt_tokens), "prompt");
  add("Cancelled sequences", fmtNum(s.cancelled), "cancelled");
  const r = s.rate_limit;
  const left = (b) => `${fmtNum(b.remaining)} of ${fmtNum(b.limit)} per minute (full in ${b.reset_s.toFixed(1)} s)`;
  add(`Requests left for ${s.key}`, left(r.requests), "requests");
  add(`Tokens left for ${s.key}`, left(r.tokens), "tokens");
  dl.replaceChildren(...rows);
}

async function poll() {
  try {
    show(await getJSON("/yunque/status"));
    $("health-error").textContent = "";
  } catch (err) {
    $("health-error").textContent = describe(err);
  }
}

export function startHealth() {
  if (timer !== null) return;
  last = null;
  poll();
  timer = setInterval(poll, 2000);
}

export function stopHealth() {
  if (timer !== null) clearInterval(timer);
  timer = null;
}
