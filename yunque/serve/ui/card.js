// The model card: what is served, the training run that wrote it, and its recorded hashes checked now.

import { describe, el, fmtMetrics, fmtNum, getJSON } from "./api.js";

const $ = (id) => document.getElementById(id);
let loaded = false;

function row(dl, name, value) {
  if (value === null || value === undefined || value === "") return;
  dl.append(el("dt", {}, name), el("dd", {}, typeof value === "object" ? JSON.stringify(value) : String(value)));
}

function dtypes(d) {
  const names = Object.keys(d || {});
  return names.length ? names.map((k) => `${k} (${d[k]} tensors)`).join(", ") : null;
}

function runBlock(run) {
  const box = el("div", { class: "run-record" });
  box.append(el("h2", {}, `Training run of the ${run.of}: ${run.run_json}`));
  const dl = el("dl", { class: "facts" });
  row(dl, "Method", run.method);
  row(dl, "Steps", run.steps);
  row(dl, "Tokens", run.tokens === undefined ? null : fmtNum(run.tokens));
  row(dl, "Seed", run.seed);
  row(dl, "Final metrics", fmtMetrics(run.final_metrics));
  row(dl, "Best metrics", run.best_metrics && fmtMetrics({ step: run.best_step, ...run.best_metrics }));
  const data = run.data || {};
  row(dl, "Data manifest SHA-256", data.manifest_sha256);
  const splits = (data.manifest_roots && data.manifest_roots.splits) || {};
  for (const [name, s] of Object.entries(splits)) {
    if (s && s.merkle_root) row(dl, `Merkle root (${name})`, s.merkle_root);
  }
  row(dl, "yunque", [run.yunque_version, run.git_commit && run.git_commit.slice(0, 12)].filter(Boolean).join(" @ "));
  box.append(dl);
  if (run.config) {
    const pre = el("pre", {});
    pre.textContent = JSON.stringify(run.config, null, 1);
    box.append(el("details", {}, el("summary", {}, "Config"), pre));
  }
  return box;
}

function showFacts(c) {
  const dl = $("card-facts");
  dl.replaceChildren();
  row(dl, "Model", c.id);
  row(dl, "Architecture", c.architecture);
  row(dl, "Parameters", `${fmtNum(c.parameters)} (${(c.parameters / 1e6).toFixed(2)}M)`);
  row(dl, "Shape", `${c.layers} layers, hidden ${c.hidden_size}, MLP ${c.intermediate_size}, ${c.heads} heads (${c.kv_heads} kv), vocab ${c.vocab_size}`);
  row(dl, "Context", `${fmtNum(c.context)} tokens, RoPE theta ${fmtNum(c.rope_theta)}${c.tied_embeddings ? ", tied embeddings" : ""}`);
  row(dl, "Weights on disk", dtypes(c.weights_dtype));
  row(dl, "Serving dtype", c.serving_dtype);
  row(dl, "Quantisation", c.quantization ? c.quantization : "none");
  if (c.adapter) {
    const a = c.adapter;
    row(dl, "Adapter (merged)", `${a.dir}: ${a.peft_type || "LoRA"} r=${a.r}, alpha=${a.lora_alpha}, targets ${(a.target_modules || []).join(", ")}`);
  } else row(dl, "Adapter", "none");
  if (c.imported_from) row(dl, "Imported from", `${c.imported_from.file || "GGUF"} (SHA-256 ${c.imported_from.sha256})`);
  const runs = $("card-runs");
  runs.replaceChildren(...c.runs.map(runBlock));
  if (c.runs.length === 0) runs.append(el("p", { class: "hint" }, "No run.json of a yunque training run lists these files."));
}

const VERDICTS = {
  verified: "Verified: every recorded SHA-256 matches the served files now.",
  mismatch: "MISMATCH: a served file differs from its recorded SHA-256 (or is missing).",
  unrecorded: "Not verified: no training record lists (all of) the served weights; their SHA-256 now is shown.",
  no_files: "No files to check (the model was not loaded from a directory).",
};

async function verify() {
  const status = $("verify-status");
  status.textContent = "Checking…";
  status.className = "verdict";
  $("verify").disabled = true;
  try {
    const v = await getJSON("/yunque/card/verify");
    status.textContent = `${VERDICTS[v.verdict] || v.verdict} (${v.files.length} files, checked at ${new Date(v.checked_at * 1000).toLocaleTimeString()} in ${v.seconds} s)`;
    status.className = "verdict " + v.verdict;
    status.dataset.verdict = v.verdict;
    const body = $("verify-files").tBodies[0];
    body.replaceChildren(
      ...v.files.map((f) =>
        el(
          "tr",
          { class: f.status },
          el("td", {}, `${f.of === "adapter" ? "adapter/" : ""}${f.file}`),
          el("td", {}, f.status),
          el("td", { class: "hash" }, f.sha256 || "-"),
          el("td", { class: "hash" }, f.recorded || "-"),
        ),
      ),
    );
  } catch (err) {
    status.textContent = describe(err);
    status.className = "verdict mismatch";
  } finally {
    $("verify").disabled = false;
  }
}

export async function showCard() {
  if (loaded) return;
  try {
    showFacts(await getJSON("/yunque/card"));
    loaded = true;
    $("card-error").textContent = "";
  } catch (err) {
    $("card-error").textContent = describe(err);
    return;
  }
  await verify();
}

export function initCard() {
  $("verify").addEventListener("click", verify);
}
