// The dashboard's shell: sign-in, navigation, and a hash router (#/jobs, #/jobs/ID, #/new, #/upload).

import { ApiProblem, apiKey, checkKey, onUnauthorized, setApiKey } from "./api.js";
import { h, problemBox, replace } from "./dom.js";
import { jobsView } from "./jobs.js";

// The list is the first page most visits see: it loads with the shell; the other views
// (and their charts and form builder) load when first opened.
const lazy = (module, name) => async (root, param) => (await import(module))[name](root, param);

const main = document.getElementById("view");
const nav = document.getElementById("nav");
let cleanup = null;
let routed = 0;
let signInProblem = null;

const ROUTES = [
  [/^#\/jobs\/([A-Za-z0-9_-]+)$/, lazy("./job.js", "jobView")],
  [/^#\/jobs(?:\?(.*))?$/, jobsView],
  [/^#\/new(?:\?(.*))?$/, lazy("./create.js", "createView")],
  [/^#\/upload$/, lazy("./upload.js", "uploadView")],
];

function signInView(root) {
  const key = h("input", {
    id: "api-key",
    name: "api-key",
    type: "password",
    autocomplete: "off",
    required: true,
    placeholder: "sq_…",
    "aria-describedby": "signin-help",
  });
  const status = h("div", { id: "signin-status", "aria-live": "polite" });
  if (signInProblem) status.append(problemBox(signInProblem));
  const button = h("button", { type: "submit", id: "signin-submit" }, "Sign in");
  const form = h(
    "form",
    { id: "signin", class: "card narrow", novalidate: true },
    h("h1", {}, "Sign in"),
    h(
      "p",
      { id: "signin-help", class: "muted" },
      "Your squish API key (squish keys create, or the key squish serve printed). It is kept in this tab only and sent as the Authorization header.",
    ),
    h("label", { for: "api-key" }, "API key"),
    key,
    button,
    status,
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const value = key.value.trim();
    if (!value) {
      replace(status, problemBox({ title: "API key needed", detail: "Paste your API key." }));
      return;
    }
    button.disabled = true;
    replace(status, h("p", { class: "muted" }, "Checking the key…"));
    try {
      await checkKey(value);
      setApiKey(value);
      signInProblem = null;
      const wanted = sessionStorage.getItem("squish.after") || "#/jobs";
      sessionStorage.removeItem("squish.after");
      if (location.hash === wanted) route();
      else location.hash = wanted;
    } catch (error) {
      const problem = error instanceof ApiProblem ? error.problem : { title: "Error", detail: String(error) };
      replace(status, problemBox(problem));
      key.select();
    } finally {
      button.disabled = false;
    }
  });
  replace(root, form);
  key.focus();
  return null;
}

function renderNav() {
  const signedIn = Boolean(apiKey());
  const current = location.hash.split("?")[0];
  const link = (href, text, id) =>
    h("a", { href, id, class: current === href || (href === "#/jobs" && current.startsWith("#/jobs")) ? "active" : null }, text);
  replace(
    nav,
    h("a", { href: "#/jobs", class: "brand" }, "squish"),
    signedIn ? [link("#/jobs", "Jobs", "nav-jobs"), link("#/new", "New job", "nav-new"), link("#/upload", "Upload", "nav-upload")] : null,
    h("span", { class: "spacer" }),
    signedIn
      ? h(
          "button",
          {
            type: "button",
            id: "signout",
            class: "link",
            onclick: () => {
              setApiKey(null);
              location.hash = "#/signin";
            },
          },
          "Sign out",
        )
      : null,
  );
}

function route() {
  if (cleanup) cleanup();
  cleanup = null;
  renderNav();
  const hash = location.hash || "#/jobs";
  if (!apiKey() || hash === "#/signin") {
    if (hash !== "#/signin") sessionStorage.setItem("squish.after", hash);
    document.title = "Sign in · squish";
    cleanup = signInView(main);
    return;
  }
  const generation = ++routed;
  for (const [pattern, view] of ROUTES) {
    const match = hash.match(pattern);
    if (match) {
      const shown = view(main, match[1] || "");
      if (shown instanceof Promise) {
        // A lazily loaded view: its cleanup arrives later, unless the route changed meanwhile.
        shown.then(
          (stop) => {
            if (generation === routed) cleanup = stop || null;
            else if (stop) stop();
          },
          (error) => replace(main, problemBox({ title: "The page could not be loaded", detail: String(error) })),
        );
      } else {
        cleanup = shown || null;
      }
      return;
    }
  }
  location.replace("#/jobs");
}

onUnauthorized((problem) => {
  if (!apiKey()) return;
  setApiKey(null);
  signInProblem = problem;
  sessionStorage.setItem("squish.after", location.hash);
  if (location.hash === "#/signin") route();
  else location.hash = "#/signin";
});

window.addEventListener("hashchange", route);
route();
