// The squish API from the browser: the key in this tab's sessionStorage, sent as a Bearer
// header (no cookies); failures as ApiProblem carrying the RFC 9457 problem details.

const KEY = "squish.apiKey";

export function apiKey() {
  return sessionStorage.getItem(KEY);
}

export function setApiKey(key) {
  if (key) sessionStorage.setItem(KEY, key);
  else sessionStorage.removeItem(KEY);
}

export class ApiProblem extends Error {
  constructor(problem) {
    super(problem.detail || problem.title || `HTTP ${problem.status}`);
    this.problem = problem;
    this.status = problem.status;
  }
}

/** Listeners told when the API refuses the key (401): the app signs out. */
const unauthorizedListeners = [];
export function onUnauthorized(listener) {
  unauthorizedListeners.push(listener);
}

function headers(extra) {
  const out = new Headers(extra || {});
  const key = apiKey();
  if (key && !out.has("Authorization")) out.set("Authorization", `Bearer ${key}`);
  return out;
}

async function problemOf(response) {
  let body = null;
  const type = response.headers.get("Content-Type") || "";
  if (type.includes("json")) {
    try {
      body = await response.json();
    } catch {
      body = null;
    }
  }
  const problem = {
    status: response.status,
    title: response.statusText || "Error",
    detail: "",
    ...(body && typeof body === "object" ? body : {}),
  };
  const retry = response.headers.get("Retry-After");
  if (retry) problem.retryAfter = Number(retry);
  if (!problem.detail && !body) problem.detail = `The server answered ${response.status}.`;
  return problem;
}

async function check(response, { signOutOn401 = true } = {}) {
  if (response.ok) return response;
  const problem = await problemOf(response);
  if (response.status === 401 && signOutOn401) unauthorizedListeners.forEach((f) => f(problem));
  throw new ApiProblem(problem);
}

async function send(path, init, options) {
  let response;
  try {
    response = await fetch(path, { ...init, headers: headers(init && init.headers), credentials: "omit" });
  } catch (error) {
    throw new ApiProblem({ status: 0, title: "Network error", detail: `The API could not be reached (${error.message}).` });
  }
  return check(response, options);
}

/** GET/POST JSON; resolves to the parsed body (null for 204). */
export async function api(path, { method = "GET", body, headers: extra, signOutOn401 } = {}) {
  const init = { method, headers: { Accept: "application/json", ...(extra || {}) } };
  if (body !== undefined) {
    init.body = JSON.stringify(body);
    init.headers["Content-Type"] = "application/json";
  }
  const response = await send(path, init, { signOutOn401 });
  if (response.status === 204) return null;
  return response.json();
}

/** Checks a key without storing it: resolves, or throws the API's 401 problem. */
export async function checkKey(key) {
  await api("/v1/jobs?limit=1", { headers: { Authorization: `Bearer ${key}` }, signOutOn401: false });
}

/** Download with the Bearer header and save it under `filename` through a blob URL. */
export async function download(path, filename) {
  const blob = await fetchBlob(path);
  const url = URL.createObjectURL(blob);
  const link = document.createElement("a");
  link.href = url;
  link.download = filename;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60_000);
  return blob;
}

export async function fetchBlob(path, type) {
  const response = await send(path, { method: "GET" });
  const blob = await response.blob();
  return type ? new Blob([blob], { type }) : blob;
}

/**
 * Multipart upload with progress (XMLHttpRequest: fetch reports no upload progress).
 * Resolves to the created resource; rejects with ApiProblem.
 */
export function upload(path, formData, onProgress) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", path);
    xhr.setRequestHeader("Authorization", `Bearer ${apiKey()}`);
    xhr.setRequestHeader("Accept", "application/json");
    xhr.responseType = "text";
    xhr.upload.addEventListener("progress", (event) => {
      if (event.lengthComputable && onProgress) onProgress(event.loaded / event.total);
    });
    xhr.addEventListener("load", () => {
      let body = null;
      try {
        body = xhr.responseText ? JSON.parse(xhr.responseText) : null;
      } catch {
        body = null;
      }
      if (xhr.status >= 200 && xhr.status < 300) {
        resolve(body);
        return;
      }
      const problem = { status: xhr.status, title: xhr.statusText || "Error", detail: "", ...(body || {}) };
      if (xhr.status === 401) unauthorizedListeners.forEach((f) => f(problem));
      reject(new ApiProblem(problem));
    });
    xhr.addEventListener("error", () =>
      reject(new ApiProblem({ status: 0, title: "Network error", detail: "The upload was cut off; try again." })),
    );
    xhr.send(formData);
  });
}

/**
 * Follow a job's Server-Sent Events with the Bearer header (EventSource cannot send
 * headers): fetch streaming, parsed here. Calls onEvent({id, event, data}) per event;
 * reconnects with Last-Event-ID until the stream ends normally, `stop()` or a 4xx.
 */
export function followEvents(jobId, onEvent, { onState, after = 0 } = {}) {
  const controller = new AbortController();
  let lastId = after;
  let retryMs = 1000;
  let stopped = false;

  async function once() {
    const init = { headers: headers({ Accept: "text/event-stream" }), signal: controller.signal, credentials: "omit" };
    if (lastId) init.headers.set("Last-Event-ID", String(lastId));
    const response = await fetch(`/v1/jobs/${encodeURIComponent(jobId)}/events`, init);
    await check(response);
    onState && onState("open");
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value.replace(/\r\n?/g, "\n");
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        const event = { id: null, event: "message", data: "" };
        const data = [];
        for (const line of block.split("\n")) {
          if (!line || line.startsWith(":")) continue;
          const colon = line.indexOf(":");
          const field = colon < 0 ? line : line.slice(0, colon);
          const text = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
          if (field === "data") data.push(text);
          else if (field === "event") event.event = text;
          else if (field === "id") event.id = text;
          else if (field === "retry" && /^\d+$/.test(text)) retryMs = Number(text);
        }
        if (event.id !== null && /^\d+$/.test(event.id)) lastId = Number(event.id);
        if (!data.length) continue;
        try {
          event.data = JSON.parse(data.join("\n"));
        } catch {
          event.data = { message: data.join("\n") };
        }
        onEvent(event);
      }
    }
  }

  (async () => {
    while (!stopped) {
      try {
        await once();
        // The stream ends after the job's terminal status (or early with an `error` event):
        // the caller decides, from the job, whether to follow again.
        onState && onState("ended");
        return;
      } catch (error) {
        if (stopped || error.name === "AbortError") return;
        if (error instanceof ApiProblem && error.status >= 400 && error.status < 500) {
          onState && onState("refused", error.problem);
          return;
        }
        onState && onState("reconnecting");
        await new Promise((resolve) => setTimeout(resolve, retryMs));
      }
    }
  })();

  return {
    stop() {
      stopped = true;
      controller.abort();
    },
    get lastId() {
      return lastId;
    },
  };
}
