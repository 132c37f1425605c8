// Inline SVG charts drawn from the measured metrics: the per-step waterfall and a search's
// Pareto scatter. A figure that was not measured is left out and said so, never guessed.

import { bytes, h, ms, num, pct, s } from "./dom.js";

/** The first batch size's key (`batch_1`, ...), numerically smallest. */
export function firstBatch(latency) {
  const keys = Object.keys(latency || {});
  keys.sort((a, b) => Number(a.replace(/\D/g, "")) - Number(b.replace(/\D/g, "")));
  return keys[0] || null;
}

function p50(figures, batch) {
  const latency = figures && figures.latency_ms;
  if (!latency) return undefined;
  const key = batch && latency[batch] ? batch : firstBatch(latency);
  return key && latency[key] ? latency[key].p50 : undefined;
}

function niceMax(value) {
  if (!(value > 0)) return 1;
  const exp = 10 ** Math.floor(Math.log10(value));
  for (const m of [1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10]) if (m * exp >= value) return m * exp;
  return 10 * exp;
}

function ticks(min, max, count = 4) {
  const out = [];
  for (let i = 0; i <= count; i += 1) out.push(min + ((max - min) * i) / count);
  return out;
}

/** The stages of a pipeline job: the original, each step, the artifact when it differs. */
export function stages(metrics) {
  const out = [{ label: "original", figures: metrics.original || {}, fidelity: { cosine_similarity: 1, top1_agreement: 1 } }];
  (metrics.steps || []).forEach((step, index) => {
    out.push({ label: `${index + 1}. ${step.method}`, figures: step, fidelity: step.fidelity || {} });
  });
  const last = out[out.length - 1];
  const compressed = metrics.compressed || {};
  if (out.length === 1 || metrics.conversion || compressed.size_bytes !== last.figures.size_bytes) {
    out.push({ label: metrics.conversion ? `artifact (${metrics.conversion.format})` : "artifact", figures: compressed, fidelity: metrics.fidelity || {} });
  }
  return out;
}

const W = 760;
const PANEL_H = 170;
const LEFT = 86;
const RIGHT = 16;

function panel(svg, top, title, values, format, kind, labels) {
  const innerW = W - LEFT - RIGHT;
  const plotTop = top + 26;
  const plotH = PANEL_H - 64;
  const band = innerW / values.length;
  const group = s("g", { class: `panel panel-${kind}`, "data-panel": kind });
  svg.append(group);
  group.append(s("text", { x: 8, y: top + 16, class: "chart-title" }, title));
  const measured = values.filter((v) => typeof v === "number");
  if (!measured.length) {
    group.append(s("text", { x: LEFT, y: plotTop + plotH / 2, class: "chart-note" }, "not measured"));
    return;
  }
  let lo = 0;
  let hi = niceMax(Math.max(...measured));
  if (kind === "quality") {
    const min = Math.min(...measured);
    const max = Math.max(...measured);
    const pad = Math.max((max - min) * 0.25, 0.005);
    lo = Math.max(0, min - pad);
    hi = Math.min(1, max + pad);
    if (hi <= lo) hi = lo + 0.01;
  }
  const y = (v) => plotTop + plotH - ((v - lo) / (hi - lo)) * plotH;
  for (const t of ticks(lo, hi)) {
    group.append(s("line", { x1: LEFT, x2: W - RIGHT, y1: y(t), y2: y(t), class: "grid-line" }));
    group.append(s("text", { x: LEFT - 6, y: y(t) + 4, class: "axis-label", "text-anchor": "end" }, format(t)));
  }
  let prev;
  values.forEach((value, i) => {
    const cx = LEFT + band * i + band / 2;
    const barW = Math.min(56, band * 0.6);
    group.append(
      s("text", { x: cx, y: plotTop + plotH + 16, class: "axis-label step-label", "text-anchor": "middle" }, labels[i].length > 18 ? `${labels[i].slice(0, 17)}…` : labels[i]),
    );
    if (typeof value !== "number") {
      group.append(s("text", { x: cx, y: plotTop + plotH - 6, class: "chart-note", "text-anchor": "middle" }, "not measured"));
      return;
    }
    const tip = `${labels[i]}: ${format(value)}`;
    if (kind === "quality") {
      if (typeof prev === "number") {
        const px = LEFT + band * (i - 1) + band / 2;
        group.append(s("line", { x1: px, x2: cx, y1: y(prev), y2: y(value), class: "quality-line" }));
      }
      group.append(s("circle", { cx, cy: y(value), r: 5, class: "quality-dot", "data-value": value }, s("title", {}, tip)));
      group.append(s("text", { x: cx, y: y(value) - 9, class: "value-label", "text-anchor": "middle" }, format(value)));
    } else {
      const from = typeof prev === "number" && i > 0 ? prev : 0;
      const top1 = y(Math.max(from, value));
      const height = Math.max(1.5, Math.abs(y(from) - y(value)));
      const change = from === 0 ? "base" : value < from ? "down" : value > from ? "up" : "same";
      if (from !== 0) {
        const px = LEFT + band * (i - 1) + band / 2 + barW / 2;
        group.append(s("line", { x1: px, x2: cx - barW / 2, y1: y(from), y2: y(from), class: "connector" }));
      }
      group.append(
        s("rect", { x: cx - barW / 2, y: top1, width: barW, height, class: `bar bar-${change}`, "data-value": value }, s("title", {}, tip)),
      );
      const delta = from ? ` (${value <= from ? "−" : "+"}${Math.abs((1 - value / from) * 100).toFixed(1)} %)` : "";
      group.append(s("text", { x: cx, y: top1 - 6, class: "value-label", "text-anchor": "middle" }, format(value) + delta));
    }
    prev = value;
  });
}

/** The per-step waterfall: size and latency after each step (bars from the previous
 * stage's value), and accuracy (or fidelity) after each step. */
export function waterfall(metrics) {
  const list = stages(metrics);
  const labels = list.map((st) => st.label);
  const batch = firstBatch((metrics.original || {}).latency_ms);
  const hasAccuracy = list.some((st) => typeof st.figures.accuracy === "number");
  const panels = [
    ["size", "Size (file bytes)", list.map((st) => st.figures.size_bytes), bytes],
    ["latency", `Latency p50, ${batch ? batch.replace("_", " ") : "first batch"}`, list.map((st) => p50(st.figures, batch)), ms],
    hasAccuracy
      ? ["quality", "Accuracy (eval)", list.map((st) => st.figures.accuracy), (v) => pct(v, 2)]
      : ["quality", "Fidelity (cosine similarity to the original)", list.map((st) => st.fidelity.cosine_similarity), (v) => num(v, 5)],
  ];
  const height = PANEL_H * panels.length;
  const svg = s("svg", {
    id: "waterfall",
    class: "chart",
    viewBox: `0 0 ${W} ${height}`,
    role: "img",
    "aria-label": "Size, latency and accuracy after each step",
    "data-stages": String(list.length),
  });
  panels.forEach(([kind, title, values, format], i) => panel(svg, i * PANEL_H, title, values, format, kind, labels));
  return h(
    "figure",
    { class: "chart-figure" },
    svg,
    h("figcaption", { class: "muted" }, "Each bar starts at the stage before it: green where a step made the model smaller or faster, red where it grew or slowed."),
  );
}

// --- search -----------------------------------------------------------------------------

const PALETTE = [
  [68, 1, 84],
  [59, 82, 139],
  [33, 145, 140],
  [94, 201, 98],
  [253, 231, 37],
];

export function colour(t) {
  const x = Math.max(0, Math.min(1, Number.isFinite(t) ? t : 0)) * (PALETTE.length - 1);
  const i = Math.min(PALETTE.length - 2, Math.floor(x));
  const f = x - i;
  const c = PALETTE[i].map((a, k) => Math.round(a + (PALETTE[i + 1][k] - a) * f));
  return `rgb(${c[0]}, ${c[1]}, ${c[2]})`;
}

export function trialQuality(trial) {
  const m = trial.metrics || {};
  if (m.compressed && typeof m.compressed.accuracy === "number") return { kind: "accuracy", value: m.compressed.accuracy };
  if (m.fidelity && typeof m.fidelity.cosine_similarity === "number") return { kind: "cosine", value: m.fidelity.cosine_similarity };
  return { kind: null, value: undefined };
}

export function trialPoint(trial) {
  const m = trial.metrics || {};
  const compressed = m.compressed || {};
  return { x: p50(compressed, firstBatch(compressed.latency_ms)), y: compressed.size_bytes };
}

/** Latency against size, one mark per measured trial: filled = feasible, cross =
 * infeasible, ringed = on the Pareto front, large = best; colour = accuracy (or fidelity). */
export function pareto(search) {
  const trials = (search.trials || []).filter((t) => {
    const p = trialPoint(t);
    return typeof p.x === "number" && typeof p.y === "number";
  });
  if (!trials.length) return h("p", { class: "muted", id: "pareto-empty" }, "No trial has been measured yet.");
  const front = new Set(search.pareto || []);
  const width = 640;
  const height = 380;
  const left = 84;
  const bottom = 48;
  const top = 16;
  const right = 120;
  const xs = trials.map((t) => trialPoint(t).x);
  const ys = trials.map((t) => trialPoint(t).y);
  const qs = trials.map((t) => trialQuality(t).value).filter((v) => typeof v === "number");
  const qMin = qs.length ? Math.min(...qs) : 0;
  const qMax = qs.length ? Math.max(...qs) : 1;
  const xMax = niceMax(Math.max(...xs) * 1.05);
  const yMax = niceMax(Math.max(...ys) * 1.05);
  const px = (v) => left + (v / xMax) * (width - left - right);
  const py = (v) => height - bottom - (v / yMax) * (height - top - bottom);
  const svg = s("svg", { id: "pareto", class: "chart", viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": "Trials: latency against size" });
  for (const t of ticks(0, xMax)) {
    svg.append(s("line", { x1: px(t), x2: px(t), y1: top, y2: height - bottom, class: "grid-line" }));
    svg.append(s("text", { x: px(t), y: height - bottom + 16, class: "axis-label", "text-anchor": "middle" }, ms(t)));
  }
  for (const t of ticks(0, yMax)) {
    svg.append(s("line", { x1: left, x2: width - right, y1: py(t), y2: py(t), class: "grid-line" }));
    svg.append(s("text", { x: left - 6, y: py(t) + 4, class: "axis-label", "text-anchor": "end" }, bytes(t)));
  }
  svg.append(s("text", { x: (left + width - right) / 2, y: height - 8, class: "axis-title", "text-anchor": "middle" }, "latency p50, first batch size"));
  svg.append(s("text", { x: 14, y: (top + height - bottom) / 2, class: "axis-title", "text-anchor": "middle", transform: `rotate(-90 14 ${(top + height - bottom) / 2})` }, "size"));
  const frontPoints = trials.filter((t) => front.has(t.number)).map(trialPoint).sort((a, b) => a.x - b.x);
  if (frontPoints.length > 1) {
    svg.append(s("polyline", { points: frontPoints.map((p) => `${px(p.x)},${py(p.y)}`).join(" "), class: "front-line" }));
  }
  for (const trial of trials) {
    const p = trialPoint(trial);
    const q = trialQuality(trial);
    const fill = typeof q.value === "number" ? colour(qMax > qMin ? (q.value - qMin) / (qMax - qMin) : 1) : "rgb(150, 150, 150)";
    const best = trial.number === search.best;
    const r = best ? 8 : 5.5;
    const cx = px(p.x);
    const cy = py(p.y);
    const tip = `trial ${trial.number}: ${ms(p.x)}, ${bytes(p.y)}${typeof q.value === "number" ? `, ${q.kind} ${num(q.value, 4)}` : ""}${trial.feasible === false ? ", infeasible" : ""}${best ? ", best" : ""}`;
    const g = s("g", { class: "trial-mark", "data-trial": String(trial.number), "data-feasible": String(trial.feasible !== false) }, s("title", {}, tip));
    if (trial.feasible === false) {
      g.append(s("path", { d: `M${cx - r},${cy - r}L${cx + r},${cy + r}M${cx - r},${cy + r}L${cx + r},${cy - r}`, stroke: fill, class: "infeasible" }));
    } else {
      g.append(s("circle", { cx, cy, r, fill, class: "feasible" }));
    }
    if (front.has(trial.number)) g.append(s("circle", { cx, cy, r: r + 3.5, class: "front-ring" }));
    if (best) g.append(s("text", { x: cx + r + 5, y: cy + 4, class: "value-label" }, "best"));
    svg.append(g);
  }
  // Colour legend.
  const lx = width - right + 28;
  const defs = s("defs", {}, s("linearGradient", { id: "quality-gradient", x1: "0", x2: "0", y1: "1", y2: "0" }, PALETTE.map((_, i) => s("stop", { offset: `${(i / (PALETTE.length - 1)) * 100}%`, "stop-color": colour(i / (PALETTE.length - 1)) }))));
  svg.append(defs);
  if (qs.length) {
    const kind = trialQuality(trials.find((t) => typeof trialQuality(t).value === "number")).kind;
    svg.append(s("text", { x: lx - 8, y: top + 8, class: "axis-label" }, kind === "accuracy" ? "accuracy" : "cosine"));
    svg.append(s("rect", { x: lx, y: top + 16, width: 14, height: 160, fill: "url(#quality-gradient)", class: "legend-bar" }));
    const fmt = kind === "accuracy" ? (v) => pct(v, 1) : (v) => num(v, 4);
    svg.append(s("text", { x: lx + 20, y: top + 24, class: "axis-label" }, fmt(qMax)));
    svg.append(s("text", { x: lx + 20, y: top + 176, class: "axis-label" }, fmt(qMin)));
  }
  svg.append(s("circle", { cx: lx + 7, cy: top + 206, r: 5, fill: "rgb(150, 150, 150)" }));
  svg.append(s("text", { x: lx + 18, y: top + 210, class: "axis-label" }, "feasible"));
  svg.append(s("path", { d: `M${lx + 2},${top + 222}L${lx + 12},${top + 232}M${lx + 2},${top + 232}L${lx + 12},${top + 222}`, stroke: "rgb(150, 150, 150)", class: "infeasible" }));
  svg.append(s("text", { x: lx + 18, y: top + 231, class: "axis-label" }, "infeasible"));
  svg.append(s("circle", { cx: lx + 7, cy: top + 250, r: 8, class: "front-ring" }));
  svg.append(s("text", { x: lx + 18, y: top + 254, class: "axis-label" }, "Pareto"));
  return h("figure", { class: "chart-figure" }, svg);
}
