// The one place the console talks to the API: /api/v1 on the page's own origin, with the key
// the user pasted. The key lives in sessionStorage (this tab only); a 401 anywhere ends the session.

const STORE = "clarity.console";
const BASE = "/api/v1";

export const session = {
  get() {
    try { return JSON.parse(sessionStorage.getItem(STORE)) || null; } catch { return null; }
  },
  save(key, role) { sessionStorage.setItem(STORE, JSON.stringify({ key, role })); },
  clear() { sessionStorage.removeItem(STORE); },
};

let onUnauthorized = () => {};
export function whenUnauthorized(callback) { onUnauthorized = callback; }

export class ApiError extends Error {
  constructor(status, body, headers) {
    const error = (body && body.error) || {};
    super(error.message || (status ? `The API answered ${status}.` : "The API could not be reached."));
    this.status = status;
    this.code = error.code || (status ? "http_" + status : "network_error");
    this.requestId = error.request_id || null;
    this.details = error.details || null;
    this.retryAfter = headers ? headers.get("Retry-After") : null;
  }
}

// What each status means for the person at the screen; the API's own message follows it.
const HINTS = {
  400: "The request was not accepted.",
  401: "The API key was refused: sign in again.",
  403: "Your role may not do this.",
  404: "Not found: it may have been deleted.",
  409: "This conflicts with what is already stored.",
  413: "The file is too large.",
  415: "This kind of file is not accepted.",
  422: "The photograph could not be used.",
  429: "Too many requests: wait a moment and try again.",
  503: "The service is unavailable for a moment: try again shortly.",
};

function flatten(details, path = []) {
  // {"json": {"name": ["Missing data"]}} -> ["name: Missing data"]
  if (Array.isArray(details)) return [`${path.slice(1).join(".") || path.join(".")}: ${details.join(" ")}`];
  if (details && typeof details === "object") {
    return Object.entries(details).flatMap(([k, v]) => flatten(v, [...path, k]));
  }
  return [];
}

export function describe(error) {
  if (!(error instanceof ApiError)) return String(error && error.message || error);
  const parts = [];
  const hint = HINTS[error.status] || (error.status >= 500 ? HINTS[503] : "");
  if (hint) parts.push(hint);
  if (error.message && error.message !== hint) parts.push(error.message);
  if (error.details) parts.push(flatten(error.details).join("; "));
  if (error.retryAfter && error.status === 429) parts.push(`Retry after ${error.retryAfter} s.`);
  if (error.requestId) parts.push(`(request ${error.requestId})`);
  return parts.filter(Boolean).join(" ");
}

function headers(extra = {}) {
  const s = session.get();
  return { ...(s ? { Authorization: `Bearer ${s.key}` } : {}), ...extra };
}

async function failure(response) {
  let body = null;
  try { body = await response.json(); } catch { /* not JSON */ }
  const error = new ApiError(response.status, body, response.headers);
  if (response.status === 401) onUnauthorized(error);
  return error;
}

async function call(path, { method = "GET", json, query, extraHeaders, key } = {}) {
  const url = new URL(BASE + path, location.origin);
  for (const [k, v] of Object.entries(query || {})) if (v !== undefined && v !== null && v !== "") url.searchParams.set(k, v);
  const init = { method, headers: headers(extraHeaders), credentials: "omit", cache: "no-store" };
  if (key) init.headers.Authorization = `Bearer ${key}`;
  if (json !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(json);
  }
  let response;
  try {
    response = await fetch(url, init);
  } catch (exc) {
    throw new ApiError(0, { error: { message: "The API could not be reached: check the connection." } });
  }
  if (!response.ok) throw await failure(response);
  return response;
}

export async function getJSON(path, options) {
  const response = await call(path, options);
  return response.status === 204 ? null : response.json();
}

export const postJSON = (path, json, options = {}) => getJSON(path, { ...options, method: "POST", json });

export async function getBlob(path, options) {
  return (await call(path, options)).blob();
}

// Probes a key without keeping it: which of the role-limited lists answer says the role.
// Neither probe reads patient data (GET /patients would, and be audited as such).
export async function probeRole(key) {
  const status = async (path, query) => {
    try { await call(path, { key, query }); return 200; } catch (e) {
      if (e.status === 401 || e.status === 0) throw e;
      return e.status;
    }
  };
  const audit = await status("/audit-events", { limit: 1 });
  if (audit === 403) return "clinician";
  const models = await status("/models");
  return models === 403 ? "auditor" : "admin";
}

export function newIdempotencyKey() {
  // crypto.randomUUID needs a secure context; getRandomValues works everywhere.
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return "console-" + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

// One photograph, with upload progress (fetch has none) and retries on network errors with the
// same Idempotency-Key, so a retry after a lost answer returns the first result, not a second copy.
export function upload(path, form, { idempotencyKey, onProgress, onRetry, attempts = 4 } = {}) {
  const key = idempotencyKey || newIdempotencyKey();
  const once = () => new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", BASE + path);
    for (const [k, v] of Object.entries(headers({ "Idempotency-Key": key }))) xhr.setRequestHeader(k, v);
    xhr.responseType = "json";
    xhr.timeout = 180000;
    xhr.upload.onprogress = (e) => { if (e.lengthComputable) onProgress?.(e.loaded / e.total); };
    xhr.onload = () => {
      const body = xhr.response;
      if (xhr.status >= 200 && xhr.status < 300) { resolve({ status: xhr.status, body }); return; }
      const h = new Headers();
      const retry = xhr.getResponseHeader("Retry-After");
      if (retry) h.set("Retry-After", retry);
      const error = new ApiError(xhr.status, body, h);
      if (xhr.status === 401) onUnauthorized(error);
      reject(error);
    };
    const network = () => reject(new ApiError(0, { error: { message: "The upload was interrupted." } }));
    xhr.onerror = network;
    xhr.ontimeout = network;
    xhr.onabort = network;
    xhr.send(form);
  });
  return (async () => {
    for (let attempt = 1; ; attempt++) {
      try {
        return await once();
      } catch (error) {
        if (error.status !== 0 || attempt >= attempts) throw error;
        onRetry?.(attempt);
        await new Promise((r) => setTimeout(r, 500 * 2 ** (attempt - 1)));
      }
    }
  })();
}

// Every page of a cursor-paginated list, up to `max` items.
export async function all(path, { limit = 100, max = 5000, query = {} } = {}) {
  const items = [];
  let cursor = null;
  do {
    const page = await getJSON(path, { query: { ...query, limit, cursor } });
    items.push(...page.items);
    cursor = page.next_cursor;
  } while (cursor && items.length < max);
  return { items, complete: !cursor };
}
