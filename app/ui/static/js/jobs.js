// The jobs list: the API's cursor pagination, a status filter, live status and progress.

import { ApiProblem, api } from "./api.js";
import { TERMINAL, duration, h, problemBox, progressBar, replace, statusBadge, when } from "./dom.js";

const STATUSES = ["", "queued", "running", "succeeded", "failed", "cancelled"];
const PAGE_SIZES = [25, 50, 100, 200];
const POLL_MS = 2000;

function recipe(spec) {
  if (!spec) return "";
  if (spec.search) return "search";
  return (spec.pipeline || []).map((step) => step.method).join(" → ");
}

function row(job) {
  const tr = h("tr", { "data-job": job.id });
  fill(tr, job);
  return tr;
}

function signature(job) {
  return `${job.status}|${job.progress}|${job.stage || ""}`;
}

function fill(tr, job) {
  tr.dataset.status = job.status;
  tr.dataset.sig = signature(job);
  replace(
    tr,
    h("td", {}, h("a", { href: `#/jobs/${job.id}`, class: "mono" }, job.id)),
    h("td", {}, statusBadge(job.status)),
    h(
      "td",
      { class: "progress-cell" },
      progressBar(job.status === "succeeded" ? 1 : job.progress),
      job.stage && !TERMINAL.has(job.status) ? h("span", { class: "muted stage" }, job.stage) : null,
      job.error ? h("span", { class: "muted error-code" }, job.error.code) : null,
    ),
    h("td", {}, recipe(job.spec)),
    h("td", { class: "mono muted" }, job.model_id || "—"),
    h("td", { class: "nowrap" }, when(job.created_at)),
    h("td", { class: "nowrap" }, job.started_at ? duration(job.started_at, job.finished_at) : "—"),
  );
}

export function jobsView(root, query) {
  const params = new URLSearchParams(query || "");
  const state = {
    status: STATUSES.includes(params.get("status") || "") ? params.get("status") || "" : "",
    limit: PAGE_SIZES.includes(Number(params.get("limit"))) ? Number(params.get("limit")) : 50,
    cursors: [null], // cursors[i] is the cursor of page i; the last one is the page shown
    next: null,
    timer: null,
    alive: true,
    rows: new Map(),
  };
  document.title = "Jobs · squish";

  const status = h(
    "select",
    { id: "filter-status", "aria-label": "Status" },
    STATUSES.map((s) => h("option", { value: s, selected: s === state.status }, s || "any status")),
  );
  const size = h(
    "select",
    { id: "page-size", "aria-label": "Jobs per page" },
    PAGE_SIZES.map((n) => h("option", { value: String(n), selected: n === state.limit }, `${n} per page`)),
  );
  const prev = h("button", { type: "button", id: "page-prev", disabled: true }, "← Newer");
  const next = h("button", { type: "button", id: "page-next", disabled: true }, "Older →");
  const pageLabel = h("span", { id: "page-label", class: "muted" });
  const body = h("tbody", { id: "jobs-body" });
  const message = h("div", { id: "jobs-message", "aria-live": "polite" });
  const table = h(
    "table",
    { id: "jobs", class: "grid" },
    h(
      "thead",
      {},
      h("tr", {}, ["Job", "Status", "Progress", "Recipe", "Model", "Created", "Took"].map((t) => h("th", { scope: "col" }, t))),
    ),
    body,
  );
  replace(
    root,
    h(
      "section",
      { class: "card" },
      h(
        "div",
        { class: "toolbar" },
        h("h1", {}, "Jobs"),
        h("span", { class: "spacer" }),
        status,
        size,
        h("a", { href: "#/new", class: "button" }, "New job"),
      ),
      message,
      h("div", { class: "table-wrap" }, table),
      h("div", { class: "pager" }, prev, pageLabel, next),
    ),
  );

  function url() {
    const q = new URLSearchParams({ limit: String(state.limit) });
    if (state.status) q.set("status", state.status);
    const cursor = state.cursors[state.cursors.length - 1];
    if (cursor) q.set("cursor", cursor);
    return `/v1/jobs?${q}`;
  }

  async function load({ fresh = false } = {}) {
    clearTimeout(state.timer);
    let page;
    try {
      page = await api(url());
    } catch (error) {
      if (!state.alive) return;
      replace(message, problemBox(error instanceof ApiProblem ? error.problem : { title: "Error", detail: String(error) }));
      if (!(error instanceof ApiProblem) || error.status !== 401) schedule();
      return;
    }
    if (!state.alive) return;
    replace(message);
    render(page, fresh);
    schedule();
  }

  function schedule() {
    clearTimeout(state.timer);
    state.timer = setTimeout(() => (document.hidden ? schedule() : load()), POLL_MS);
  }

  function render(page, fresh) {
    state.next = page.next_cursor;
    if (fresh) {
      replace(body);
      state.rows.clear();
    }
    // Keyed update: rows that did not change are left alone (no flicker, focus kept).
    const seen = new Set();
    let previous = null;
    for (const job of page.items) {
      seen.add(job.id);
      let tr = state.rows.get(job.id);
      if (!tr) {
        tr = row(job);
        state.rows.set(job.id, tr);
      } else if (tr.dataset.sig !== signature(job)) {
        fill(tr, job);
      }
      if (previous ? previous.nextSibling !== tr : body.firstChild !== tr) {
        if (previous) previous.after(tr);
        else body.prepend(tr);
      }
      previous = tr;
    }
    for (const [id, tr] of state.rows) {
      if (!seen.has(id)) {
        tr.remove();
        state.rows.delete(id);
      }
    }
    if (!page.items.length) {
      replace(
        body,
        h("tr", { class: "empty" }, h("td", { colspan: "7" }, state.cursors.length > 1 ? "No older jobs." : "No jobs yet: upload a model, then create a job.")),
      );
    }
    prev.disabled = state.cursors.length <= 1;
    next.disabled = !state.next;
    pageLabel.textContent = `Page ${state.cursors.length}`;
    table.dataset.page = String(state.cursors.length);
    table.dataset.rendered = String(page.items.length);
    performance.mark("squish:jobs-rendered");
  }

  function navigate() {
    const q = new URLSearchParams();
    if (state.status) q.set("status", state.status);
    if (state.limit !== 50) q.set("limit", String(state.limit));
    const hash = q.toString() ? `#/jobs?${q}` : "#/jobs";
    if (location.hash !== hash) history.replaceState(null, "", hash);
  }

  status.addEventListener("change", () => {
    state.status = status.value;
    state.cursors = [null];
    navigate();
    load({ fresh: true });
  });
  size.addEventListener("change", () => {
    state.limit = Number(size.value);
    state.cursors = [null];
    navigate();
    load({ fresh: true });
  });
  next.addEventListener("click", () => {
    if (!state.next) return;
    state.cursors.push(state.next);
    load({ fresh: true });
  });
  prev.addEventListener("click", () => {
    if (state.cursors.length <= 1) return;
    state.cursors.pop();
    load({ fresh: true });
  });

  load({ fresh: true });
  return () => {
    state.alive = false;
    clearTimeout(state.timer);
  };
}
