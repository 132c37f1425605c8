// Create a job: a pipeline (steps whose params come from GET /v1/methods' JSON Schemas) or
// a search (DESIGN §10), with the rest of the spec built from the API's own JobCreate
// schema in /openapi.json. A 422's errors[] are shown next to the fields they name.

import { ApiProblem, api } from "./api.js";
import { h, problemBox, replace } from "./dom.js";
import { clearErrors, control, objectFields, row, showErrors } from "./form.js";

// The search spec of DESIGN §10, used when the API's JobCreate does not publish `search`.
const SEARCH_SCHEMA = {
  type: "object",
  additionalProperties: false,
  properties: {
    objectives: {
      type: "array",
      items: { type: "string", enum: ["latency", "size", "accuracy", "fidelity"] },
      default: ["latency", "size"],
      title: "Objectives",
      description: "In priority order (the order you tick them): latency and size are minimized, accuracy and fidelity maximized.",
    },
    constraints: {
      type: "object",
      title: "Constraints",
      properties: {
        accuracy_drop: { anyOf: [{ type: "number", minimum: 0, maximum: 1 }, { type: "null" }], title: "Accuracy drop", description: "Largest allowed top-1 accuracy drop, absolute (0.01 = one point)." },
        cosine_similarity: { anyOf: [{ type: "number", minimum: -1, maximum: 1 }, { type: "null" }], title: "Cosine similarity", description: "Smallest allowed fidelity to the original." },
        latency_ms: { anyOf: [{ type: "object", additionalProperties: { type: "number" } }, { type: "null" }], title: "Latency (ms)", description: "Largest allowed p50 by batch size." },
        size_bytes: { anyOf: [{ type: "integer", minimum: 1 }, { type: "null" }], title: "Size (bytes)", description: "Largest allowed artifact size." },
        speedup: { anyOf: [{ type: "object", additionalProperties: { type: "number" } }, { type: "null" }], title: "Speedup", description: "Smallest allowed speedup by batch size." },
      },
    },
    methods: { anyOf: [{ type: "array", items: { type: "string" } }, { type: "null" }], title: "Methods", description: "Restrict the space to these methods; none ticked: every method that fits." },
    runtimes: { anyOf: [{ type: "array", items: { type: "string", enum: ["torch", "inductor", "onnxruntime"] } }, { type: "null" }], title: "Runtimes", description: "Restrict the artifact's runtime; none ticked: all that fit." },
    budget: {
      type: "object",
      title: "Budget",
      properties: {
        max_trials: { type: "integer", minimum: 1, default: 24, title: "Max trials" },
        max_seconds: { type: "integer", minimum: 10, default: 3600, title: "Max seconds" },
        parallel_trials: { type: "integer", minimum: 1, default: 2, title: "Parallel trials" },
      },
    },
    strategy: { type: "string", enum: ["tpe", "nsga2", "random", "grid"], default: "tpe", title: "Strategy" },
    seed: { anyOf: [{ type: "integer", minimum: 0 }, { type: "null" }], title: "Seed", description: "Makes the proposals reproducible." },
  },
};

// JobCreate's fields this form lays out itself; the others come from the schema as they are.
const OWN = ["model_id", "pipeline", "search", "datasets"];
const ROLES = ["calibration", "train", "eval"];

async function loadContext() {
  const [methods, openapi, models, datasets] = await Promise.all([
    api("/v1/methods"),
    fetch("/openapi.json", { credentials: "omit" }).then((r) => (r.ok ? r.json() : {})).catch(() => ({})),
    api("/v1/models?limit=200"),
    api("/v1/datasets?limit=200"),
  ]);
  return { methods: methods.items, openapi, models: models.items, datasets: datasets.items };
}

function jobCreateSchema(openapi) {
  const schemas = (openapi.components && openapi.components.schemas) || {};
  return schemas.JobCreate || { type: "object", properties: {} };
}

export function createView(root, query) {
  document.title = "New job · squish";
  const params = new URLSearchParams(query || "");
  let alive = true;
  replace(root, h("section", { class: "card" }, h("h1", {}, "New job"), h("p", { class: "muted" }, "Loading methods and schemas…")));
  loadContext()
    .then((context) => alive && render(root, context, params))
    .catch((error) => {
      if (!alive) return;
      replace(root, h("section", { class: "card" }, h("h1", {}, "New job"), problemBox(error instanceof ApiProblem ? error.problem : { title: "Error", detail: String(error) })));
    });
  return () => {
    alive = false;
  };
}

function render(root, context, params) {
  const { methods, openapi } = context;
  const byName = new Map(methods.map((m) => [m.name, m]));
  const jobSchema = jobCreateSchema(openapi);
  const searchSchema = (jobSchema.properties || {}).search || SEARCH_SCHEMA;
  const schemaRoot = (jobSchema.properties || {}).search ? openapi : SEARCH_SCHEMA;
  let idempotencyKey = crypto.randomUUID();

  // --- model and datasets (suggestions from the newest 200; any id may be typed) ---------
  const modelList = h("datalist", { id: "models-list" }, context.models.map((m) => h("option", { value: m.id }, `${m.name} (${m.format})`)));
  const datasetList = h("datalist", { id: "datasets-list" }, context.datasets.map((d) => h("option", { value: d.id }, `${d.name} (${d.format})`)));
  const model = control({ type: "string" }, { loc: ["model_id"], id: "model_id", value: params.get("model") || (context.models[0] ? context.models[0].id : ""), options: { suggest: { model_id: "models-list" } } });
  const modelInfo = h("small", { class: "muted", id: "model-info" });
  const describeModel = () => {
    const found = context.models.find((m) => m.id === model.el.value.trim());
    modelInfo.textContent = found ? `${found.name} · ${found.format} · inspection ${found.inspection_status}` : "";
  };
  model.el.addEventListener("input", describeModel);
  describeModel();
  const datasets = ROLES.map((role) => {
    const ctl = control({ type: "string" }, { loc: ["datasets", role], id: `dataset-${role}`, value: params.get(role) || "", options: { suggest: { [`datasets.${role}`]: "datasets-list" } } });
    return [role, ctl];
  });

  // --- kind: pipeline or search ------------------------------------------------------------
  const kindPipeline = h("input", { type: "radio", name: "kind", id: "kind-pipeline", value: "pipeline", checked: params.get("kind") !== "search" });
  const kindSearch = h("input", { type: "radio", name: "kind", id: "kind-search", value: "search", checked: params.get("kind") === "search" });

  // --- pipeline ------------------------------------------------------------------------------
  const steps = []; // {method, params (last read), el, fields}
  const stepsBox = h("div", { id: "steps" });
  const pipelineBox = h(
    "fieldset",
    { id: "pipeline", "data-field": "pipeline" },
    h("legend", {}, "Pipeline"),
    h("div", { class: "field-error", "data-error-for": "pipeline" }),
    stepsBox,
    h("div", { class: "step-add" }, h("button", { type: "button", id: "add-step", onclick: () => addStep() }, "Add step")),
  );

  function readSteps() {
    for (const step of steps) if (step.fields) step.params = step.fields.read();
    return steps.map((step) => ({ method: step.method, params: step.params || {} }));
  }

  function renderSteps() {
    readSteps();
    replace(stepsBox);
    steps.forEach((step, index) => {
      const select = h(
        "select",
        { id: `step-${index}-method`, "data-loc": `pipeline.${index}.method` },
        methods.map((m) => h("option", { value: m.name, selected: m.name === step.method }, m.name)),
      );
      const method = byName.get(step.method) || methods[0];
      step.method = method.name;
      step.fields = objectFields(method.params_schema, { loc: ["pipeline", index, "params"], values: step.params || {}, idPrefix: `step-${index}` });
      select.addEventListener("change", () => {
        steps[index].method = select.value;
        steps[index].params = {};
        steps[index].fields = null;
        renderSteps();
      });
      const needs = [
        method.summary,
        `formats: ${method.formats.join(", ")}`,
        method.datasets_required.length ? `needs: ${method.datasets_required.join(", ")}` : null,
        `devices: ${method.devices.join(", ")}`,
      ].filter(Boolean);
      const move = (delta) => {
        readSteps();
        const [moved] = steps.splice(index, 1);
        steps.splice(index + delta, 0, moved);
        for (const s of steps) s.fields = null;
        renderSteps();
      };
      stepsBox.append(
        h(
          "div",
          { class: "step", "data-step": String(index), "data-field": `pipeline.${index}` },
          h(
            "div",
            { class: "step-head" },
            h("span", { class: "step-number" }, `${index + 1}`),
            h("label", { for: select.id, class: "visually-hidden" }, `Step ${index + 1} method`),
            select,
            h("span", { class: "spacer" }),
            h("button", { type: "button", class: "small", title: "Move up", disabled: index === 0, "data-action": "up", onclick: () => move(-1) }, "↑"),
            h("button", { type: "button", class: "small", title: "Move down", disabled: index === steps.length - 1, "data-action": "down", onclick: () => move(1) }, "↓"),
            h(
              "button",
              {
                type: "button",
                class: "small danger",
                title: "Remove",
                "data-action": "remove",
                onclick: () => {
                  readSteps();
                  steps.splice(index, 1);
                  for (const s of steps) s.fields = null;
                  renderSteps();
                },
              },
              "Remove",
            ),
          ),
          h("p", { class: "muted method-summary" }, needs.join(" · ")),
          h("div", { class: "field-error", "data-error-for": `pipeline.${index}.method` }),
          h("div", { class: "field-error", "data-error-for": `pipeline.${index}` }),
          step.fields.el,
        ),
      );
    });
    // The fields were just built from step.params: reading them again gives the same.
    for (const step of steps) step.params = step.fields.read();
  }

  function addStep(name) {
    readSteps();
    steps.push({ method: name || (byName.has("quantize.dynamic") ? "quantize.dynamic" : methods[0].name), params: {} });
    renderSteps();
  }

  for (const name of (params.get("steps") || "").split(",").filter((n) => byName.has(n))) steps.push({ method: name, params: {} });
  if (!steps.length) steps.push({ method: byName.has("quantize.dynamic") ? "quantize.dynamic" : methods[0].name, params: {} });
  renderSteps();

  // --- search --------------------------------------------------------------------------------
  const search = objectFields(resolveRoot(searchSchema, schemaRoot), {
    root: schemaRoot,
    loc: ["search"],
    idPrefix: "search",
    options: { choices: { "search.methods": methods.map((m) => m.name) } },
  });
  const searchBox = h(
    "fieldset",
    { id: "search", "data-field": "search" },
    h("legend", {}, "Search"),
    h("p", { class: "muted" }, "squish finds the recipe: trials of pipelines, ranked on part of the eval data, constraints verified on a held-out part."),
    h("div", { class: "field-error", "data-error-for": "search" }),
    search.el,
  );

  // --- the rest of JobCreate, from its schema ------------------------------------------------
  const rest = objectFields(jobSchema, { root: openapi, loc: [], idPrefix: "job", skip: OWN });

  const summary = h("div", { id: "form-problem", "aria-live": "polite" });
  const unplaced = h("div", { id: "form-unplaced" });
  const submit = h("button", { type: "submit", id: "submit-job", class: "primary" }, "Create job");
  const form = h(
    "form",
    { id: "job-form", class: "card", novalidate: true },
    h("h1", {}, "New job"),
    modelList,
    datasetList,
    row("Model", model, ["model_id"], null),
    modelInfo,
    h(
      "fieldset",
      { id: "datasets", "data-field": "datasets" },
      h("legend", {}, "Datasets"),
      h("div", { class: "field-error", "data-error-for": "datasets" }),
      h("div", { class: "fields" }, datasets.map(([role, ctl]) => row(role, ctl, ["datasets", role], role === "eval" ? "labelled data gives accuracy" : null))),
    ),
    h(
      "div",
      { class: "kind-choice", role: "radiogroup", "aria-label": "Kind of job" },
      h("label", { class: "check", for: "kind-pipeline" }, kindPipeline, "Pipeline: the steps you choose"),
      h("label", { class: "check", for: "kind-search" }, kindSearch, "Search: the smallest or fastest model that meets your constraints"),
    ),
    pipelineBox,
    searchBox,
    h("fieldset", { id: "options" }, h("legend", {}, "Target, output and evaluation"), rest.el),
    summary,
    unplaced,
    h("div", { class: "actions" }, submit),
  );

  // A search carries its constraints in search.constraints: the job-level ones are hidden.
  const jobConstraints = rest.el.querySelector(':scope > [data-field="constraints"]');
  const showKind = () => {
    pipelineBox.hidden = !kindPipeline.checked;
    searchBox.hidden = !kindSearch.checked;
    if (jobConstraints) jobConstraints.hidden = kindSearch.checked;
  };
  kindPipeline.addEventListener("change", showKind);
  kindSearch.addEventListener("change", showKind);
  showKind();

  function spec() {
    const body = { model_id: model.read() || "" };
    if (kindSearch.checked) body.search = search.read();
    else body.pipeline = readSteps();
    const options = rest.read();
    if (kindSearch.checked) delete options.constraints;
    const refs = {};
    for (const [role, ctl] of datasets) {
      const value = ctl.read();
      if (value !== undefined) refs[role] = value;
    }
    if (Object.keys(refs).length) body.datasets = refs;
    Object.assign(body, options);
    return body;
  }

  form.addEventListener("input", () => {
    // A changed spec is a new request: a new Idempotency-Key.
    idempotencyKey = crypto.randomUUID();
  });
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    clearErrors(form);
    replace(summary);
    replace(unplaced);
    submit.disabled = true;
    try {
      const job = await api("/v1/jobs", { method: "POST", body: spec(), headers: { "Idempotency-Key": idempotencyKey } });
      idempotencyKey = crypto.randomUUID();
      location.hash = `#/jobs/${job.id}`;
    } catch (error) {
      const problem = error instanceof ApiProblem ? error.problem : { title: "Error", detail: String(error) };
      replace(summary, problemBox(problem));
      if (problem.errors) showErrors(form, problem.errors, unplaced);
      summary.scrollIntoView({ block: "nearest" });
    } finally {
      submit.disabled = false;
    }
  });
  replace(root, form);
  form.dataset.ready = "true";
}

function resolveRoot(schema, root) {
  let out = schema;
  for (let i = 0; i < 8; i += 1) {
    const alternatives = out.anyOf || out.oneOf;
    if (alternatives) {
      const rest = alternatives.filter((alt) => alt.type !== "null");
      if (rest.length === 1) {
        out = rest[0];
        continue;
      }
    }
    if (out.$ref) {
      let target = root;
      for (const part of out.$ref.replace(/^#\//, "").split("/")) target = target ? target[part] : undefined;
      out = target || {};
      continue;
    }
    break;
  }
  return out;
}

