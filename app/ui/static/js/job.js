// A job's page: status and progress, error, metrics, the per-step waterfall, a search's
// trials and Pareto plot, artifacts (downloads, the card) and the live event log (SSE).

import { ApiProblem, api, download, followEvents } from "./api.js";
import { firstBatch, pareto, trialPoint, trialQuality, waterfall } from "./charts.js";
import { TERMINAL, bytes, duration, h, ms, num, pct, problemBox, progressBar, replace, statusBadge, when } from "./dom.js";

const POLL_MS = 3000;
const MAX_LOG = 2000;

function problemOf(error) {
  return error instanceof ApiProblem ? error.problem : { title: "Error", detail: String(error) };
}

function dl(pairs) {
  return h(
    "dl",
    { class: "facts" },
    pairs.filter(([, v]) => v !== null && v !== undefined && v !== "").map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]),
  );
}

// --- metrics ----------------------------------------------------------------------------

function change(original, compressed, lowerIsBetter = true) {
  if (typeof original !== "number" || typeof compressed !== "number" || original === 0) return "";
  const ratio = compressed / original;
  const better = lowerIsBetter ? ratio < 1 : ratio > 1;
  return h("span", { class: ratio === 1 ? "muted" : better ? "good" : "bad" }, `${ratio < 1 ? "−" : "+"}${Math.abs((1 - ratio) * 100).toFixed(1)} %`);
}

function metricsTable(metrics) {
  const o = metrics.original || {};
  const c = metrics.compressed || {};
  const rows = [
    ["File size", o.size_bytes, c.size_bytes, bytes, true],
    ["File size, gzip", o.size_bytes_gzip, c.size_bytes_gzip, bytes, true],
    ["Parameters", o.parameters, c.parameters, num, true],
    ["Non-zero parameters", o.nonzero_parameters, c.nonzero_parameters, num, true],
    ["Sparsity", o.sparsity, c.sparsity, (v) => pct(v, 1), false],
    ["MACs per sample", o.macs, c.macs, num, true],
    ["Peak memory", o.peak_memory_bytes, c.peak_memory_bytes, bytes, true],
    ["Accuracy", o.accuracy, c.accuracy, (v) => pct(v, 2), false],
  ];
  const batches = new Set([...Object.keys(o.latency_ms || {}), ...Object.keys(c.latency_ms || {})]);
  for (const batch of [...batches].sort((a, b) => Number(a.replace(/\D/g, "")) - Number(b.replace(/\D/g, "")))) {
    const label = batch.replace("_", " ");
    const lo = (o.latency_ms || {})[batch] || {};
    const lc = (c.latency_ms || {})[batch] || {};
    rows.push([`Latency p50, ${label}`, lo.p50, lc.p50, ms, true]);
    rows.push([`Latency p95, ${label}`, lo.p95, lc.p95, ms, true]);
  }
  const shown = rows.filter(([, a, b]) => a !== undefined || b !== undefined);
  return h(
    "table",
    { class: "grid metrics", id: "metrics-table" },
    h("thead", {}, h("tr", {}, ["Figure", "Original", "Compressed", "Change"].map((t) => h("th", { scope: "col" }, t)))),
    h(
      "tbody",
      {},
      shown.map(([label, a, b, format, lower]) =>
        h("tr", { "data-figure": label }, h("th", { scope: "row" }, label), h("td", {}, a === undefined ? "—" : format(a)), h("td", {}, b === undefined ? "—" : format(b)), h("td", {}, change(a, b, lower))),
      ),
    ),
  );
}

function ratiosAndFidelity(metrics) {
  const r = metrics.ratios || {};
  const f = metrics.fidelity || {};
  const pairs = [];
  if (typeof r.size === "number") pairs.push(["Size ratio", `${num(r.size, 3)}× smaller`]);
  for (const [batch, value] of Object.entries(r.speedup || {})) pairs.push([`Speedup, ${batch.replace("_", " ")}`, `${num(value, 3)}×`]);
  if (typeof f.top1_agreement === "number") pairs.push(["Top-1 agreement", pct(f.top1_agreement, 2)]);
  if (typeof f.cosine_similarity === "number") pairs.push(["Cosine similarity", num(f.cosine_similarity, 6)]);
  if (typeof f.mse === "number") pairs.push(["MSE", num(f.mse, 4)]);
  if (typeof f.max_abs_error === "number") pairs.push(["Max abs error", num(f.max_abs_error, 4)]);
  const hw = metrics.hardware && metrics.hardware.cpu;
  if (hw) pairs.push(["Measured on", [hw.name || hw.arch, hw.instruction_sets && hw.instruction_sets.length ? ` (${hw.instruction_sets.join(", ")})` : ""].join("")]);
  if (metrics.conversion) pairs.push(["Conversion", `${metrics.conversion.format} for ${metrics.conversion.runtime}, ${num(metrics.conversion.seconds, 3)} s`]);
  return dl(pairs);
}

function stepsTable(metrics) {
  const steps = metrics.steps || [];
  if (!steps.length) return null;
  const batch = firstBatch((metrics.original || {}).latency_ms);
  return h(
    "table",
    { class: "grid", id: "steps-table" },
    h("thead", {}, h("tr", {}, ["#", "Method", "Params", "Took", "Size", `p50 ${batch ? batch.replace("_", " ") : ""}`, "Accuracy", "Cosine"].map((t) => h("th", { scope: "col" }, t)))),
    h(
      "tbody",
      {},
      steps.map((step, i) => {
        const lat = step.latency_ms && batch && step.latency_ms[batch];
        return h(
          "tr",
          {},
          h("td", {}, String(i + 1)),
          h("td", {}, step.method),
          h("td", { class: "mono small params" }, paramsText(step.params)),
          h("td", {}, `${num(step.seconds, 3)} s`),
          h("td", {}, bytes(step.size_bytes)),
          h("td", {}, lat ? ms(lat.p50) : "—"),
          h("td", {}, typeof step.accuracy === "number" ? pct(step.accuracy, 2) : "—"),
          h("td", {}, step.fidelity ? num(step.fidelity.cosine_similarity, 6) : "—"),
        );
      }),
    ),
  );
}

// --- search -------------------------------------------------------------------------------

/** `amount=0.5, scope=global`: the params that are set (null ones are defaults left open). */
function paramsText(params) {
  return Object.entries(params || {})
    .filter(([, value]) => value !== null && value !== undefined)
    .map(([key, value]) => `${key}=${typeof value === "string" ? value : JSON.stringify(value)}`)
    .join(", ");
}

function recipeText(pipeline) {
  return (pipeline || []).map((step) => step.method + (step.params && Object.keys(step.params).length ? ` (${paramsText(step.params)})` : "")).join(" → ");
}

// Where a trial's events say it is. The worker publishes metrics.search at each step of the
// search, so a trial it has started (or just ended) still says "queued" there until the next
// step: the table shows it running until the published status is a later one.
const TRIAL_EVENT_STATUS = { started: "running", finished: "running", failed: "running", cancelled: "running", retried: "queued" };

/** The trials whose events are ahead of the published table: {number: "running"}. */
function trialsAhead(search, heard) {
  const ahead = {};
  for (const trial of (search && search.trials) || []) {
    if (trial.status === "queued" && heard.get(trial.number) === "running") ahead[trial.number] = "running";
  }
  return ahead;
}

function searchSection(search, ahead = {}) {
  const trials = search.trials || [];
  const front = new Set(search.pareto || []);
  const summary = [];
  if (typeof search.met === "boolean") summary.push(["Constraints", search.met ? "met" : "not met"]);
  if (search.best !== undefined && search.best !== null) summary.push(["Best trial", String(search.best)]);
  summary.push(["Trials", `${trials.length} (${trials.filter((t) => t.status === "succeeded").length} succeeded)`]);
  if (search.objectives) summary.push(["Objectives", search.objectives.join(", ")]);
  const holdout = search.holdout;
  if (holdout && typeof holdout === "object") {
    const value = holdout.accuracy ?? holdout.cosine_similarity;
    const figure = typeof value === "object" && value !== null ? value.value : value;
    const ci = holdout.ci95 || (value && value.ci95);
    summary.push(["Held-out", `${holdout.accuracy !== undefined ? "accuracy" : "cosine"} ${num(figure, 4)}${ci ? ` [${ci.map((x) => num(x, 4)).join(", ")}]` : ""}${holdout.n ? `, n = ${holdout.n}` : ""}`]);
  }
  const unmet = (search.unmet || []).map((u) => h("li", {}, `${u.constraint}: bound ${num(u.bound, 4)}, closest ${u.closest === undefined || u.closest === null ? "not measured" : num(u.closest, 4)}`));
  const table = h(
    "table",
    { class: "grid", id: "trials" },
    h("thead", {}, h("tr", {}, ["#", "Status", "Recipe", "Format / runtime", "Size", "Latency p50", "Quality", "Feasible", "Violations", "Took"].map((t) => h("th", { scope: "col" }, t)))),
    h(
      "tbody",
      {},
      trials.map((trial) => {
        const point = trialPoint(trial);
        const quality = trialQuality(trial);
        const classes = [front.has(trial.number) ? "pareto" : "", trial.number === search.best ? "best" : ""].join(" ").trim();
        const status = ahead[trial.number] || trial.status;
        return h(
          "tr",
          { "data-trial": String(trial.number), "data-status": status || null, class: classes || null },
          h("td", {}, String(trial.number), trial.number === search.best ? h("span", { class: "badge best" }, "best") : null, front.has(trial.number) ? h("span", { class: "badge pareto" }, "Pareto") : null),
          h("td", {}, status ? statusBadge(status) : "—"),
          h("td", { class: "small" }, recipeText(trial.pipeline)),
          h("td", {}, [trial.output_format, trial.runtime].filter(Boolean).join(" / ") || "—"),
          h("td", {}, bytes(point.y)),
          h("td", {}, ms(point.x)),
          h("td", {}, typeof quality.value === "number" ? `${quality.kind === "accuracy" ? pct(quality.value, 2) : num(quality.value, 5)}` : "—"),
          h("td", {}, trial.feasible === undefined || trial.feasible === null ? "—" : trial.feasible ? "yes" : "no"),
          h("td", { class: "small" }, (trial.violations || []).map((v) => `${v.constraint}: ${v.measured === undefined || v.measured === null ? "not measured" : num(v.measured, 4)} vs ${num(v.bound, 4)}`).join("; ") || (trial.error ? `${trial.error.code}: ${trial.error.message}` : "")),
          h("td", {}, typeof trial.seconds === "number" ? `${num(trial.seconds, 3)} s` : "—"),
        );
      }),
    ),
  );
  return h(
    "section",
    { class: "card", id: "search-results" },
    h("h2", {}, "Search"),
    dl(summary),
    unmet.length ? h("div", { class: "problem" }, h("strong", {}, "Unmet constraints"), h("ul", {}, unmet)) : null,
    pareto(search),
    h("div", { class: "table-wrap" }, table),
  );
}

// --- artifacts ------------------------------------------------------------------------------

function artifactsSection(job, status) {
  if (!job.artifacts || !job.artifacts.length) return null;
  const viewer = h("div", { id: "card-viewer" });
  const rows = job.artifacts.map((artifact) => {
    const path = `/v1/jobs/${encodeURIComponent(job.id)}/artifacts/${encodeURIComponent(artifact.name)}`;
    const get = h("button", { type: "button", class: "small", "data-download": artifact.name }, "Download");
    get.addEventListener("click", async () => {
      get.disabled = true;
      replace(status, h("span", { class: "muted" }, `Downloading ${artifact.filename}…`));
      try {
        const blob = await download(path, artifact.filename);
        replace(status, h("span", { class: "good", "data-downloaded": artifact.name }, `Downloaded ${artifact.filename} (${bytes(blob.size)}).`));
      } catch (error) {
        replace(status, problemBox(problemOf(error)));
      } finally {
        get.disabled = false;
      }
    });
    const isCard = artifact.name === "card" || (artifact.media_type || "").startsWith("text/html");
    const viewerUrl = `card.html#${encodeURIComponent(job.id)}/${encodeURIComponent(artifact.name)}`;
    const open = isCard
      ? [
          h(
            "button",
            {
              type: "button",
              class: "small",
              "data-open-card": artifact.name,
              onclick: () => {
                replace(viewer, h("iframe", { src: viewerUrl, title: `The ${artifact.name} of ${job.id}`, class: "card-frame", id: "card-frame" }));
                viewer.scrollIntoView({ block: "nearest" });
              },
            },
            "Show",
          ),
          h(
            "button",
            {
              type: "button",
              class: "small",
              onclick: () => {
                // Not noopener: the new tab gets a copy of this tab's sessionStorage (the key).
                window.open(viewerUrl, "_blank");
              },
            },
            "New tab",
          ),
        ]
      : null;
    return h(
      "tr",
      { "data-artifact": artifact.name },
      h("td", {}, artifact.name),
      h("td", { class: "mono" }, artifact.filename),
      h("td", {}, bytes(artifact.size_bytes)),
      h("td", { class: "mono small", title: artifact.sha256 }, `${artifact.sha256.slice(0, 16)}…`),
      h("td", { class: "actions" }, get, open),
    );
  });
  return h(
    "section",
    { class: "card", id: "artifacts" },
    h("h2", {}, "Artifacts"),
    h("table", { class: "grid" }, h("thead", {}, h("tr", {}, ["Name", "File", "Size", "sha256", ""].map((t) => h("th", { scope: "col" }, t)))), h("tbody", {}, rows)),
    status,
    viewer,
  );
}

// --- the page -------------------------------------------------------------------------------

export function jobView(root, jobId) {
  document.title = `${jobId} · squish`;
  const state = { job: null, alive: true, timer: null, stream: null, refreshing: null, sections: {}, heard: new Map() };
  const head = h("section", { class: "card", id: "job-head" }, h("h1", { class: "mono" }, jobId), h("p", { class: "muted" }, "Loading…"));
  const errorBox = h("div", { id: "job-error" });
  const metricsBox = h("div", { id: "job-metrics" });
  const searchBox = h("div", { id: "job-search" });
  const artifactsBox = h("div", { id: "job-artifacts" });
  const downloadStatus = h("div", { id: "download-status", "aria-live": "polite" });
  const log = h("ol", { id: "event-log", class: "log" });
  const streamState = h("span", { id: "stream-state", class: "muted" }, "connecting…");
  const eventsBox = h("section", { class: "card", id: "events" }, h("div", { class: "toolbar" }, h("h2", {}, "Events"), h("span", { class: "spacer" }), streamState), log);
  replace(root, head, errorBox, metricsBox, searchBox, artifactsBox, eventsBox);

  function renderHead(job) {
    const cancel =
      !TERMINAL.has(job.status) &&
      h(
        "button",
        {
          type: "button",
          id: "cancel-job",
          class: "danger",
          onclick: async (event) => {
            event.target.disabled = true;
            try {
              await api(`/v1/jobs/${encodeURIComponent(job.id)}/cancel`, { method: "POST" });
              refresh();
            } catch (error) {
              replace(errorBox, problemBox(problemOf(error)));
              event.target.disabled = false;
            }
          },
        },
        "Cancel",
      );
    replace(
      head,
      h("div", { class: "toolbar" }, h("h1", { class: "mono" }, job.id), statusBadge(job.status), h("span", { class: "spacer" }), cancel || null),
      h("div", { class: "job-progress", id: "job-progress", "data-progress": String(job.progress) }, progressBar(job.status === "succeeded" ? 1 : job.progress), h("span", { id: "job-stage", class: "muted" }, job.stage || "")),
      dl([
        ["Model", job.model_id ? h("span", { class: "mono" }, job.model_id) : "—"],
        ["Recipe", job.spec && job.spec.search ? "search" : ((job.spec && job.spec.pipeline) || []).map((step) => step.method).join(" → ")],
        ["Queue", job.queue],
        ["Attempts", String(job.attempts)],
        ["Worker", job.worker],
        ["Created", when(job.created_at)],
        ["Started", job.started_at ? when(job.started_at) : null],
        ["Finished", job.finished_at ? when(job.finished_at) : null],
        ["Took", job.started_at ? duration(job.started_at, job.finished_at) : null],
        ["Cached from", job.cached_from ? h("a", { href: `#/jobs/${job.cached_from}`, class: "mono" }, job.cached_from) : null],
      ]),
      h("details", {}, h("summary", {}, "Spec (normalized)"), h("pre", { class: "mono", id: "job-spec" }, JSON.stringify(job.spec, null, 2))),
    );
    head.dataset.status = job.status;
  }

  function renderOnce(box, key, value, build) {
    const signature = JSON.stringify(value ?? null);
    if (state.sections[key] === signature) return;
    state.sections[key] = signature;
    replace(box, value ? build(value) : null);
  }

  function render(job) {
    state.job = job;
    renderHead(job);
    renderOnce(errorBox, "error", job.error, (error) =>
      h("section", { class: "card problem", id: "job-failure", role: "alert" }, h("h2", {}, `Failed: ${error.code}`), h("p", {}, error.message), error.step ? h("p", { class: "muted" }, `in ${error.step}`) : null),
    );
    const metrics = job.metrics && job.metrics.original ? job.metrics : null;
    renderOnce(metricsBox, "metrics", metrics, (m) =>
      h(
        "section",
        { class: "card", id: "metrics" },
        h("h2", {}, "Metrics"),
        h("div", { class: "two-col" }, h("div", {}, metricsTable(m)), h("div", {}, ratiosAndFidelity(m))),
        m.steps && m.steps.length ? [h("h3", {}, "After each step"), waterfall(m), stepsTable(m)] : null,
      ),
    );
    renderSearch(job);
    renderOnce(artifactsBox, "artifacts", job.artifacts && job.artifacts.length ? job.artifacts : null, () => artifactsSection(job, downloadStatus));
    document.title = `${job.id} · ${job.status} · squish`;
  }

  function renderSearch(job) {
    const search = job.metrics && job.metrics.search ? job.metrics.search : null;
    const ahead = trialsAhead(search, state.heard);
    renderOnce(searchBox, "search", search && { search, ahead }, (value) => searchSection(value.search, value.ahead));
  }

  function hearTrial(data) {
    const status = TRIAL_EVENT_STATUS[data.event];
    if (!Number.isInteger(data.trial) || !status) return;
    state.heard.set(data.trial, status);
    if (state.job) renderSearch(state.job);
  }

  async function refresh() {
    if (state.refreshing) return state.refreshing;
    state.refreshing = (async () => {
      try {
        const job = await api(`/v1/jobs/${encodeURIComponent(jobId)}`);
        if (state.alive) render(job);
      } catch (error) {
        if (state.alive) replace(errorBox, problemBox(problemOf(error)));
      } finally {
        state.refreshing = null;
      }
    })();
    return state.refreshing;
  }

  function schedule() {
    clearTimeout(state.timer);
    if (!state.alive) return;
    if (state.job && TERMINAL.has(state.job.status)) return;
    state.timer = setTimeout(async () => {
      if (!document.hidden) await refresh();
      schedule();
    }, POLL_MS);
  }

  let soon = null;
  function refreshSoon() {
    if (soon) return;
    soon = setTimeout(() => {
      soon = null;
      refresh();
    }, 250);
  }

  function logEvent(event) {
    const data = event.data || {};
    const item = h(
      "li",
      { class: `event event-${event.event} level-${data.level || "info"}`, "data-kind": event.event, "data-event-id": event.id || "" },
      h("time", { datetime: data.created_at || "" }, data.created_at ? new Date(data.created_at).toLocaleTimeString() : ""),
      h("span", { class: "kind" }, event.event),
      h("span", { class: "message" }, data.message || ""),
    );
    log.append(item);
    while (log.children.length > MAX_LOG) log.firstChild.remove();
    if (log.scrollHeight - log.scrollTop - log.clientHeight < 80) log.scrollTop = log.scrollHeight;
  }

  function follow() {
    state.stream = followEvents(
      jobId,
      (event) => {
        if (!state.alive) return;
        logEvent(event);
        if (event.event === "trial") hearTrial((event.data && event.data.data) || {});
        if (event.event === "status" || event.event === "progress" || event.event === "trial") refreshSoon();
      },
      {
        after: state.stream ? state.stream.lastId : 0,
        onState: async (what, problem) => {
          if (!state.alive) return;
          const labels = { open: "live", ended: "ended", reconnecting: "reconnecting…", refused: "refused" };
          streamState.textContent = labels[what] || what;
          streamState.dataset.state = what;
          if (what === "refused" && problem) replace(errorBox, problemBox(problem));
          if (what === "ended") {
            await refresh();
            // Ended early (an outage) while the job goes on: follow again from the last id.
            if (state.alive && state.job && !TERMINAL.has(state.job.status)) setTimeout(follow, 1000);
          }
        },
      },
    );
  }

  refresh().then(() => {
    if (!state.alive) return;
    follow();
    schedule();
  });

  return () => {
    state.alive = false;
    clearTimeout(state.timer);
    clearTimeout(soon);
    if (state.stream) state.stream.stop();
  };
}
