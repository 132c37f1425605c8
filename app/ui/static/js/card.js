// The card viewer (card.html#JOB_ID/ARTIFACT): fetches one HTML artifact with the Bearer
// header and shows it in a sandboxed iframe (no scripts, an opaque origin) from a blob URL.

import { ApiProblem, apiKey, fetchBlob } from "./api.js";
import { h, problemBox, replace } from "./dom.js";

if (window.opener) window.opener = null;
const status = document.getElementById("card-status");
const [jobId, name = "card"] = decodeURIComponent(location.hash.slice(1)).split("/");

async function show() {
  if (!apiKey()) {
    replace(status, problemBox({ title: "Not signed in", detail: "Sign in to the dashboard (/ui/) in this browser tab first." }));
    return;
  }
  if (!/^[A-Za-z0-9_-]{1,40}$/.test(jobId || "") || !/^[A-Za-z0-9_-]{1,40}$/.test(name)) {
    replace(status, problemBox({ title: "No card named", detail: "Open a card from its job's page." }));
    return;
  }
  try {
    const blob = await fetchBlob(`/v1/jobs/${encodeURIComponent(jobId)}/artifacts/${encodeURIComponent(name)}`, "text/html");
    const frame = h("iframe", { sandbox: "", src: URL.createObjectURL(blob), title: `${name} of ${jobId}`, id: "card-document", class: "card-document" });
    status.remove();
    document.body.append(frame);
    document.title = `${name} of ${jobId} · squish`;
  } catch (error) {
    replace(status, problemBox(error instanceof ApiProblem ? error.problem : { title: "Error", detail: String(error) }));
  }
}

show();
