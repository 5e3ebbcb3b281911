// Server health, polled every 2 s while the view is open: engine, queue, batch, tokens/s (from the
// server's token counter between two polls) and the signed-in key's rate-limit buckets.

import { describe, el, fmtNum, getJSON } from "./api.js";

const $ = (id) => document.getElementById(id);
let timer = null;
let last = null; // {t, tokens} of the previous poll

function show(s) {
  const dl = $("health-facts");
  const rows = [];
  const add = (k, v) => rows.push(el("dt", {}, k), el("dd", {}, String(v)));
  const now = performance.now();
  let rate = "-";
  if (last !== null && now > last.t) rate = ((s.completion_tokens - last.tokens) / ((now - last.t) / 1000)).toFixed(1);
  last = { t: now, tokens: s.completion_tokens };
  add("Engine", s.engine.status + (s.engine.engine_restarts ? ` (${s.engine.engine_restarts} restarts)` : "") + (s.engine.error ? ": " + s.engine.error : ""));
  add("Queue depth", `${s.queue_depth} waiting (room for ${s.max_queue})`);
  add("Running sequences", `${s.running} of ${s.max_batch} batch rows`);
  add("Tokens/s (generated, last 2 s)", rate);
  add("Tokens generated", fmtNum(s.completion_tokens));
  add("Prompt tokens", fmtNum(s.prompt_tokens));
  add("Cancelled sequences", fmtNum(s.cancelled));
  const r = s.rate_limit;
  add(`Requests left for ${s.key}`, `${r.requests.remaining} of ${r.requests.limit} per minute (full in ${r.requests.reset_s.toFixed(1)} s)`);
  add(`Tokens left for ${s.key}`, `${fmtNum(r.tokens.remaining)} of ${fmtNum(r.tokens.limit)} per minute (full in ${r.tokens.reset_s.toFixed(1)} s)`);
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
