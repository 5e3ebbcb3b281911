// Sign-in, the view tabs (#chat, #card, #runs, #health) and start-up.

import { authOff, describe, getJSON, getKey, setKey } from "./api.js";
import { clearChat, initChat, setModel } from "./chat.js";
import { initCard, showCard } from "./card.js";
import { startHealth, stopHealth } from "./health.js";
import { initRuns, showRuns } from "./runs.js";

const $ = (id) => document.getElementById(id);
const VIEWS = ["chat", "card", "runs", "health"];

function show(view) {
  if (!VIEWS.includes(view)) view = "chat";
  for (const v of VIEWS) $("view-" + v).hidden = v !== view;
  for (const b of document.querySelectorAll("#tabs .tab")) b.setAttribute("aria-pressed", String(b.dataset.view === view));
  if (view === "health") startHealth();
  else stopHealth();
  if (view === "card") showCard();
  if (view === "runs") showRuns();
  if (view === "chat") $("prompt").focus();
}

function route() {
  show(location.hash.slice(1));
}

function signedIn(modelId) {
  setModel(modelId);
  $("signin").hidden = true;
  $("tabs").hidden = false;
  $("who").hidden = false;
  $("who-name").textContent = `model ${modelId}`;
  $("signout").hidden = authOff;
  route();
}

function signedOut(message) {
  stopHealth();
  setKey(null);
  clearChat();
  for (const v of VIEWS) $("view-" + v).hidden = true;
  $("tabs").hidden = true;
  $("who").hidden = true;
  $("signin").hidden = false;
  $("signin-error").textContent = message || "";
  $("key").focus();
}

// A key is good when /v1/models answers with it; the model id comes from there too.
async function tryKey() {
  const models = await getJSON("/v1/models");
  return models.data[0].id;
}

async function start() {
  initChat();
  initCard();
  initRuns();
  for (const b of document.querySelectorAll("#tabs .tab")) {
    b.addEventListener("click", () => {
      location.hash = b.dataset.view;
    });
  }
  window.addEventListener("hashchange", route);
  $("signout").addEventListener("click", () => signedOut());
  $("signin-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const key = $("key").value.trim();
    $("key").value = "";
    setKey(key);
    try {
      signedIn(await tryKey());
    } catch (err) {
      signedOut(describe(err));
    }
  });
  $("auth-off").hidden = !authOff;
  if (authOff || getKey()) {
    try {
      signedIn(await tryKey());
      return;
    } catch (err) {
      signedOut(describe(err));
      return;
    }
  }
  signedOut();
}

start();
