// Training runs side by side: loss and lr curves (metrics.jsonl), eval tables, red-team reports.

import { describe, el, fmtMetrics, fmtNum, getJSON, hasRuns } from "./api.js";
import { lineChart } from "./chart.js";

const $ = (id) => document.getElementById(id);
let listed = false;

function pct(v) {
  return v === null || v === undefined ? "-" : `${(100 * v).toFixed(1)}%`;
}

function table(head, rows) {
  return el(
    "div",
    { class: "scroll" },
    el(
      "table",
      {},
      el("thead", {}, el("tr", {}, ...head.map((h) => el("th", { scope: "col" }, h)))),
      el("tbody", {}, ...rows.map((r) => el("tr", {}, ...r.map((c) => el("td", {}, c === null || c === undefined ? "-" : String(c)))))),
    ),
  );
}

function zip(xs, ys) {
  const out = [];
  for (let i = 0; i < xs.length; i++) if (typeof ys[i] === "number") out.push([xs[i], ys[i]]);
  return out;
}

function curves(m) {
  const box = el("div", { class: "curves" });
  const t = m.train;
  const evalLoss = m.eval && m.eval.val_loss ? zip(m.eval.step, m.eval.val_loss) : [];
  const loss = lineChart("Loss", [
    { name: "train loss", cls: "train", points: zip(t.step, t.loss) },
    { name: "val loss", cls: "val", points: evalLoss, dots: true },
  ]);
  loss.classList.add("loss-chart");
  const lr = lineChart("Learning rate", [{ name: "lr", cls: "lr", points: zip(t.step, t.lr) }]);
  lr.classList.add("lr-chart");
  box.append(el("h3", {}, "Loss"), loss, el("h3", {}, "Learning rate"), lr);
  const notes = [];
  if (t.step.length < m.points) notes.push(`${m.points} points, ${t.step.length} drawn`);
  if (m.skipped_lines) notes.push(`${m.skipped_lines} unreadable lines of metrics.jsonl skipped`);
  if (m.truncated) notes.push("metrics.jsonl read only up to its size cap");
  if (notes.length) box.append(el("p", { class: "hint" }, notes.join("; ")));
  return box;
}

function evalBlock(e) {
  const names = [...new Set(e.models.flatMap((m) => Object.keys(m.metrics)))];
  return el(
    "div",
    { class: "eval" },
    el("h3", {}, `Evaluation: ${e.file}${e.data ? " (" + e.data + ")" : ""}`),
    table(
      ["Metric", ...e.models.map((m) => m.name)],
      names.map((n) => [n, ...e.models.map((m) => fmtNum(m.metrics[n]))]),
    ),
  );
}

function redteamBlock(r) {
  const o = r.overall;
  const rows = r.categories.map((c) => [c.title || c.key, c.owasp, c.attempts, c.errors, pct(c.asr), pct(c.no_refusal_rate), pct(c.harmful_rate), pct(c.over_refusal)]);
  const box = el(
    "div",
    { class: "redteam" },
    el("h3", {}, `Red team: ${r.file}${r.target ? " (" + r.target + ")" : ""}`),
    table(["Category", "OWASP", "Attempts", "Failed", "ASR", "No refusal", "Harmful", "Over-refusal"], rows),
    el("p", {}, `Overall ASR ${pct(o.asr)} over ${o.attack_attempts ?? "-"} attack attempts` + (o.asr_ci95 ? ` (95% CI ${pct(o.asr_ci95[0])}-${pct(o.asr_ci95[1])})` : "") + (o.errors ? `; ${o.errors} requests failed` : "")),
  );
  if (r.gate) box.append(el("p", {}, `Gate (fail above ${pct(r.gate.fail_above)}): ${r.gate.failed.length ? "FAILED: " + r.gate.failed.join(", ") : "passed"}`));
  return box;
}

async function showRun(name, col) {
  const box = $(col);
  box.replaceChildren();
  if (!name) return;
  box.append(el("p", { class: "hint" }, "Loading…"));
  let r;
  try {
    r = await getJSON("/yunque/runs/" + encodeURIComponent(name));
  } catch (err) {
    box.replaceChildren(el("p", { class: "error" }, describe(err)));
    return;
  }
  const parts = [el("h2", {}, r.name)];
  if (r.run) {
    const s = r.run;
    const dl = el("dl", { class: "facts" });
    const add = (k, v) => {
      if (v !== undefined && v !== null) dl.append(el("dt", {}, k), el("dd", {}, String(v)));
    };
    add("Method", s.method);
    add("Steps", s.steps);
    add("Tokens", s.tokens === undefined ? null : fmtNum(s.tokens));
    add("Final", fmtMetrics(s.final_metrics));
    add("Best", s.best_metrics && fmtMetrics({ step: s.best_step, ...s.best_metrics }));
    add("Data manifest", s.data_manifest_sha256);
    parts.push(dl);
  }
  parts.push(r.metrics ? curves(r.metrics) : el("p", { class: "hint" }, "No metrics.jsonl in this run."));
  for (const e of r.evals) parts.push(evalBlock(e));
  for (const t of r.redteam) parts.push(redteamBlock(t));
  box.replaceChildren(...parts);
  box.dataset.run = r.name;
}

export async function showRuns() {
  if (!hasRuns) {
    $("runs-none").hidden = false;
    $("runs-pick").hidden = true;
    return;
  }
  if (listed) return;
  try {
    const { runs } = await getJSON("/yunque/runs");
    const fill = (sel, pick) => {
      sel.replaceChildren(el("option", { value: "" }, "(none)"), ...runs.map((r) => el("option", { value: r.name }, r.name + (r.method ? ` (${r.method})` : ""))));
      sel.value = pick;
    };
    fill($("run-a"), runs[0] ? runs[0].name : "");
    fill($("run-b"), runs[1] ? runs[1].name : "");
    listed = true;
    $("runs-error").textContent = runs.length ? "" : "The runs directory holds no runs (folders with metrics.jsonl or run.json).";
    await Promise.all([showRun($("run-a").value, "col-a"), showRun($("run-b").value, "col-b")]);
  } catch (err) {
    $("runs-error").textContent = describe(err);
  }
}

export function initRuns() {
  $("run-a").addEventListener("change", () => showRun($("run-a").value, "col-a"));
  $("run-b").addEventListener("change", () => showRun($("run-b").value, "col-b"));
}
