// Upload a model or a dataset (multipart, with progress); a refused file shows the
// API's problem detail.

import { ApiProblem, upload } from "./api.js";
import { bytes, h, problemBox, replace } from "./dom.js";

function uploadForm({ kind, title, accept, help, extra, done }) {
  const prefix = kind === "models" ? "model" : "dataset";
  const file = h("input", { type: "file", id: `${prefix}-file`, name: "file", accept, required: true });
  const name = h("input", { type: "text", id: `${prefix}-name`, name: "name", placeholder: "(the file name)" });
  const bar = h("progress", { max: "1", value: "0", hidden: true, id: `${prefix}-progress` });
  const result = h("div", { id: `${prefix}-result`, "aria-live": "polite" });
  const submit = h("button", { type: "submit", id: `${prefix}-submit` }, `Upload ${prefix}`);
  const form = h(
    "form",
    { class: "card upload", id: `${prefix}-upload`, novalidate: true },
    h("h2", {}, title),
    h("p", { class: "muted" }, help),
    h("label", { for: file.id }, "File"),
    file,
    h("label", { for: name.id }, "Name"),
    name,
    extra ? extra.el : null,
    submit,
    bar,
    result,
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    if (!file.files.length) {
      replace(result, problemBox({ title: "No file chosen", detail: "Choose a file to upload." }));
      return;
    }
    const data = new FormData();
    data.append("file", file.files[0]);
    if (name.value.trim()) data.append("name", name.value.trim());
    if (extra) extra.add(data);
    submit.disabled = true;
    bar.hidden = false;
    bar.value = 0;
    replace(result, h("p", { class: "muted" }, `Uploading ${file.files[0].name} (${bytes(file.files[0].size)})…`));
    try {
      const created = await upload(`/v1/${kind}`, data, (fraction) => {
        bar.value = fraction;
      });
      replace(result, done(created));
      form.reset();
    } catch (error) {
      replace(result, problemBox(error instanceof ApiProblem ? error.problem : { title: "Error", detail: String(error) }));
    } finally {
      submit.disabled = false;
      bar.hidden = true;
    }
  });
  return form;
}

function created(resource, actions) {
  return h(
    "div",
    { class: "created", "data-id": resource.id },
    h("p", { class: "good" }, "Uploaded ", h("code", { class: "mono created-id" }, resource.id), ` (${resource.format}, ${bytes(resource.size_bytes)}).`),
    h("p", { class: "mono small muted" }, `sha256 ${resource.sha256}`),
    actions,
  );
}

export function uploadView(root) {
  document.title = "Upload · squish";
  const format = h(
    "select",
    { id: "model-format", name: "format" },
    h("option", { value: "" }, "detect from the file"),
    ["pt2", "onnx", "hf"].map((f) => h("option", { value: f }, f)),
  );
  const models = uploadForm({
    kind: "models",
    title: "Model",
    accept: ".pt2,.onnx,.zip",
    help: "A torch.export program (.pt2), an ONNX model (.onnx) or a zipped Hugging Face folder (config and safetensors). Pickled modules are refused.",
    extra: {
      el: h("div", {}, h("label", { for: "model-format" }, "Format"), format),
      add: (data) => format.value && data.append("format", format.value),
    },
    done: (model) => created(model, h("p", {}, h("a", { href: `#/new?model=${encodeURIComponent(model.id)}`, class: "button", id: "use-model" }, "Create a job with this model"))),
  });
  const datasets = uploadForm({
    kind: "datasets",
    title: "Dataset",
    accept: ".npz,.safetensors,.jsonl",
    help: "For calibration, training or evaluation: .npz or .safetensors with an inputs array (and optional labels), or .jsonl with text (and label).",
    done: (dataset) => created(dataset, null),
  });
  replace(root, h("div", { class: "two-col" }, models, datasets));
  return null;
}
