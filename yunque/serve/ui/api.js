// The key and every call to the server. The key lives in sessionStorage only (this tab, gone when
// it closes) and travels as a bearer header, never in a URL.

const KEY = "yunque.key";
export const authOff = document.querySelector('meta[name="yunque-auth"]').content === "off";
export const hasRuns = document.querySelector('meta[name="yunque-runs"]').content === "on";

export function getKey() {
  return sessionStorage.getItem(KEY);
}

export function setKey(key) {
  if (key) sessionStorage.setItem(KEY, key);
  else sessionStorage.removeItem(KEY);
}

export class APIError extends Error {
  constructor(status, code, message, retryAfter) {
    super(message);
    this.status = status;
    this.code = code;
    this.retryAfter = retryAfter;
  }
}

async function errorOf(r) {
  let code = null;
  let message = r.statusText || "error";
  try {
    const body = await r.json();
    if (body && body.error) {
      code = body.error.code;
      message = body.error.message || message;
    }
  } catch (_) {
    // not JSON: the status says enough
  }
  const retry = r.headers.get("retry-after");
  return new APIError(r.status, code, message, retry === null ? null : Number(retry));
}

// fetch on this origin with the key; resolves to the response when it is 2xx, else throws an APIError.
export async function call(path, options = {}) {
  const headers = new Headers(options.headers || {});
  const key = getKey();
  if (key) headers.set("Authorization", "Bearer " + key);
  const r = await fetch(path, { ...options, headers, cache: "no-store", credentials: "omit", referrerPolicy: "no-referrer" });
  if (!r.ok) throw await errorOf(r);
  return r;
}

export async function getJSON(path) {
  return (await call(path)).json();
}

// One line a person can act on, for every error the API gives.
export function describe(err) {
  if (!(err instanceof APIError)) {
    if (err && err.name === "AbortError") return "Stopped.";
    return "Cannot reach the server: " + (err && err.message ? err.message : String(err));
  }
  const m = err.message;
  switch (err.status) {
    case 401:
      return "The server refused the key (401): it is wrong, revoked or expired. Sign out and sign in with a valid key.";
    case 429:
      if (err.code === "overloaded") return `The server is busy (429): retry in ${err.retryAfter ?? 1} s.`;
    {
      const what = /for (requests|tokens) per minute \(limit (\d+)\)/.exec(m);
      const limit = what ? ` of ${what[2]} ${what[1]} per minute` : "";
      return `Rate limit${limit} reached (429): retry in ${err.retryAfter ?? "a few"} s.`;
    }
    case 413:
      return "The request is too large for this server (413): " + m;
    case 503:
      return "The server cannot generate right now (503): " + m;
  }
  if (err.code === "context_length_exceeded") return "The prompt is too long (400): " + m;
  if (err.code === "content_policy_violation") return "Refused by the server's input guard (400): " + m;
  if (err.code === "string_above_max_length") return "The conversation is too long (400): " + m;
  return `Error ${err.status}${err.code ? " (" + err.code + ")" : ""}: ${m}`;
}

// Element helper: text only, never HTML.
export function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v;
    else e.setAttribute(k, v);
  }
  for (const c of children) {
    if (c === null || c === undefined) continue;
    e.append(typeof c === "string" || typeof c === "number" ? String(c) : c);
  }
  return e;
}

// {name: number} as "name 1.234, other 5"
export function fmtMetrics(obj) {
  if (!obj || typeof obj !== "object") return null;
  return Object.entries(obj)
    .map(([k, v]) => `${k} ${fmtNum(v)}`)
    .join(", ");
}

export function fmtNum(v, digits = 4) {
  if (v === null || v === undefined) return "-";
  if (typeof v !== "number") return String(v);
  if (Number.isInteger(v)) return v.toLocaleString("en");
  return Number(v.toPrecision(digits)).toString();
}
