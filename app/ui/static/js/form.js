// Form fields built from JSON Schema (the params of GET /v1/methods): numbers, enums,
// booleans, strings, arrays (of scalars or of objects), nullable fields, $ref; anything
// else as JSON. Each field knows its `loc`, so a 422's errors[] land next to it.

import { h, replace } from "./dom.js";

let uid = 0;
const nextId = (prefix) => `${prefix}-${++uid}`;

function resolve(schema, root) {
  let out = schema || {};
  for (let i = 0; i < 8 && out.$ref; i += 1) {
    const path = out.$ref.replace(/^#\//, "").split("/");
    let target = root;
    for (const part of path) target = target ? target[part] : undefined;
    out = { ...(target || {}), ...Object.fromEntries(Object.entries(out).filter(([k]) => k !== "$ref")) };
  }
  return out;
}

/** The schema without its `null` alternative, and whether null is allowed. */
export function unwrap(schema, root) {
  const resolved = resolve(schema, root);
  const alternatives = resolved.anyOf || resolved.oneOf;
  if (alternatives) {
    const rest = alternatives.filter((alt) => alt.type !== "null");
    const nullable = rest.length < alternatives.length;
    if (rest.length === 1) {
      const { anyOf, oneOf, ...outer } = resolved;
      return { schema: { ...resolve(rest[0], root), ...outer }, nullable };
    }
    return { schema: resolved, nullable };
  }
  return { schema: resolved, nullable: Array.isArray(resolved.type) && resolved.type.includes("null") };
}

function typeOf(schema) {
  if (Array.isArray(schema.type)) return schema.type.find((t) => t !== "null");
  return schema.type;
}

function humanize(name) {
  const text = String(name).replace(/_/g, " ");
  return text.charAt(0).toUpperCase() + text.slice(1);
}

export function locKey(loc) {
  return loc.map(String).join(".");
}

function hint(schema) {
  const bounds = [];
  if (schema.minimum !== undefined) bounds.push(`≥ ${schema.minimum}`);
  if (schema.exclusiveMinimum !== undefined) bounds.push(`> ${schema.exclusiveMinimum}`);
  if (schema.maximum !== undefined) bounds.push(`≤ ${schema.maximum}`);
  if (schema.exclusiveMaximum !== undefined) bounds.push(`< ${schema.exclusiveMaximum}`);
  return bounds.join(", ");
}

function parseNumber(text, integer) {
  const trimmed = text.trim();
  if (trimmed === "") return undefined;
  const value = Number(trimmed);
  // Not a number: sent as typed, so the API's 422 names the field.
  if (!Number.isFinite(value)) return trimmed;
  return integer && Number.isInteger(value) ? value : value;
}

function same(a, b) {
  return JSON.stringify(a) === JSON.stringify(b);
}

/**
 * A control for one value. Returns {el, read(), focus()}: read() gives the value, or
 * `undefined` for "leave it out" (an empty nullable or an untouched default).
 */
export function control(schema, { root, loc, id, value, nullable, options = {} }) {
  const type = typeOf(schema);
  const dataLoc = locKey(loc);
  const suggestions = (options.suggest || {})[dataLoc];
  if (schema.enum) {
    const values = schema.enum;
    const select = h(
      "select",
      { id, "data-loc": dataLoc },
      nullable || value === undefined ? h("option", { value: "" }, nullable ? "— (none)" : "— choose —") : null,
      values.map((option, i) => h("option", { value: String(i), selected: same(option, value) }, String(option))),
    );
    return { el: select, read: () => (select.value === "" ? undefined : values[Number(select.value)]) };
  }
  if (type === "boolean") {
    if (nullable) {
      const select = h(
        "select",
        { id, "data-loc": dataLoc },
        h("option", { value: "" }, "— (default)"),
        h("option", { value: "true", selected: value === true }, "true"),
        h("option", { value: "false", selected: value === false }, "false"),
      );
      return { el: select, read: () => (select.value === "" ? undefined : select.value === "true") };
    }
    const box = h("input", { id, type: "checkbox", "data-loc": dataLoc, checked: value === true });
    return { el: box, read: () => box.checked };
  }
  if (type === "integer" || type === "number") {
    const input = h("input", {
      id,
      type: "number",
      step: type === "integer" ? "1" : "any",
      inputmode: type === "integer" ? "numeric" : "decimal",
      "data-loc": dataLoc,
      value: value === undefined || value === null ? "" : String(value),
      placeholder: nullable ? "(none)" : "",
    });
    return { el: input, read: () => parseNumber(input.value, type === "integer") };
  }
  if (type === "array") {
    const items = unwrap(schema.items || {}, root).schema;
    const itemType = typeOf(items);
    if (itemType === "object" && items.properties) return objectList(schema, items, { root, loc, id, value });
    const choices = items.enum || (options.choices || {})[dataLoc];
    if (choices) return checkboxes(choices, { loc, id, value, nullable });
    if (itemType === "string" || itemType === "number" || itemType === "integer" || items.enum) {
      const numeric = itemType !== "string" && !items.enum;
      const text = Array.isArray(value) ? value.join(numeric ? ", " : "\n") : "";
      const input = numeric
        ? h("input", { id, type: "text", "data-loc": dataLoc, value: text, placeholder: "comma-separated, e.g. 1, 32" })
        : h("textarea", { id, rows: "2", "data-loc": dataLoc, placeholder: nullable ? "(none) — one per line" : "one per line" }, text);
      return {
        el: input,
        read: () => {
          const parts = input.value.split(numeric ? /[\s,]+/ : /\n/).map((p) => p.trim()).filter(Boolean);
          if (!parts.length) return undefined;
          return numeric ? parts.map((p) => parseNumber(p, itemType === "integer")) : parts;
        },
      };
    }
  }
  if (type === "string" || (!type && suggestions)) {
    const input = h("input", { id, type: "text", "data-loc": dataLoc, value: value ?? "", placeholder: nullable ? "(none)" : "" });
    if (suggestions) input.setAttribute("list", suggestions);
    return { el: input, read: () => (input.value.trim() === "" ? undefined : input.value.trim()) };
  }
  if (type === "object" && schema.properties) {
    const fields = objectFields(schema, { root, loc, values: value || {}, options });
    const box = h("fieldset", { id, class: "nested", "data-loc": dataLoc }, fields.el);
    return {
      el: box,
      read: () => {
        const out = fields.read();
        return Object.keys(out).length ? out : undefined;
      },
    };
  }
  const extra = schema.additionalProperties && unwrap(schema.additionalProperties, root).schema;
  if (type === "object" && extra && ["number", "integer"].includes(typeOf(extra))) {
    const text = value && typeof value === "object" ? Object.entries(value).map(([k, v]) => `${k}=${v}`).join(", ") : "";
    const input = h("input", { id, type: "text", "data-loc": dataLoc, value: text, placeholder: "key=value, e.g. batch_1=0.5, batch_32=4" });
    return {
      el: input,
      read: () => {
        const pairs = input.value.split(/[\s,]+/).map((p) => p.trim()).filter(Boolean);
        if (!pairs.length) return undefined;
        const out = {};
        for (const pair of pairs) {
          const [key, raw] = pair.split("=");
          out[key.trim()] = parseNumber(raw === undefined ? "" : raw, typeOf(extra) === "integer") ?? raw;
        }
        return out;
      },
    };
  }
  // Anything else: JSON.
  const area = h("textarea", { id, rows: "3", class: "mono", "data-loc": dataLoc, placeholder: "JSON" }, value === undefined ? "" : JSON.stringify(value));
  return {
    el: area,
    read: () => {
      if (!area.value.trim()) return undefined;
      try {
        return JSON.parse(area.value);
      } catch {
        return area.value;
      }
    },
  };
}

/** Checkboxes for a list of choices; the order they were ticked in is kept (priority). */
function checkboxes(choices, { loc, id, value, nullable }) {
  const order = Array.isArray(value) ? value.filter((v) => choices.some((c) => same(c, v))) : [];
  const group = h("div", { class: "checks", id, "data-loc": locKey(loc), role: "group" });
  const marks = new Map();
  const renumber = () => {
    for (const [choice, mark] of marks) {
      const at = order.findIndex((v) => same(v, choice));
      mark.textContent = at >= 0 && order.length > 1 ? ` ${at + 1}` : "";
    }
  };
  choices.forEach((choice, i) => {
    const boxId = `${id}-${i}`;
    const box = h("input", { type: "checkbox", id: boxId, value: String(choice), checked: order.some((v) => same(v, choice)) });
    const mark = h("span", { class: "order muted" });
    marks.set(choice, mark);
    box.addEventListener("change", () => {
      const at = order.findIndex((v) => same(v, choice));
      if (box.checked && at < 0) order.push(choice);
      if (!box.checked && at >= 0) order.splice(at, 1);
      renumber();
    });
    group.append(h("label", { class: "check", for: boxId }, box, String(choice), mark));
  });
  renumber();
  return { el: group, read: () => (order.length ? [...order] : undefined) };
}

function objectList(schema, items, { root, loc, id, value }) {
  const list = h("div", { class: "object-list", id, "data-loc": locKey(loc) });
  const rows = [];
  const add = (initial) => {
    const index = rows.length;
    const fields = objectFields(items, { root, loc: [...loc, index], values: initial || {} });
    const row = { fields };
    const remove = h("button", { type: "button", class: "small", title: "Remove" }, "Remove");
    const el = h("div", { class: "object-row" }, fields.el, remove);
    remove.addEventListener("click", () => {
      rows.splice(rows.indexOf(row), 1);
      el.remove();
    });
    row.el = el;
    rows.push(row);
    addButton.before(el);
  };
  const addButton = h("button", { type: "button", class: "small" }, `Add ${items.title || "item"}`);
  addButton.addEventListener("click", () => add());
  list.append(addButton);
  (Array.isArray(value) ? value : []).forEach(add);
  return { el: list, read: () => rows.map((row) => row.fields.read()) };
}

/**
 * The fields of an object schema (a method's params). `values` pre-fills; defaults are
 * filled from the schema. read() returns only the fields that are required or differ
 * from the default, so a spec says what was chosen.
 */
export function objectFields(schema, { root, loc, values = {}, idPrefix = "f", options = {}, skip = [] }) {
  const rootSchema = root || schema;
  const properties = schema.properties || {};
  const required = new Set(schema.required || []);
  const wrap = h("div", { class: "fields" });
  const readers = [];
  for (const [name, raw] of Object.entries(properties)) {
    if (skip.includes(name)) continue;
    const { schema: field, nullable } = unwrap(raw, rootSchema);
    const id = nextId(idPrefix);
    const initial = name in values ? values[name] : field.default ?? raw.default;
    const ctl = control(field, { root: rootSchema, loc: [...loc, name], id, value: initial === null ? undefined : initial, nullable, options });
    // The property's own title, not that of a referenced schema ("ModelFormat").
    const title = raw.title || humanize(name);
    const bounds = hint(field);
    const description = raw.description || field.description || "";
    const label = h("label", { for: id }, title, required.has(name) ? h("span", { class: "required", title: "required" }, " *") : null);
    const row = h(
      "div",
      { class: `field field-${typeOf(field) || "json"}`, "data-field": locKey([...loc, name]) },
      label,
      ctl.el,
      description || bounds ? h("small", { class: "muted" }, [description, bounds ? ` (${bounds})` : ""].join("")) : null,
      h("div", { class: "field-error", "data-error-for": locKey([...loc, name]) }),
    );
    wrap.append(row);
    const fallback = raw.default !== undefined ? raw.default : field.default;
    readers.push([name, ctl, fallback]);
  }
  return {
    el: wrap,
    read() {
      const out = {};
      for (const [name, ctl, fallback] of readers) {
        const value = ctl.read();
        if (value === undefined) continue;
        if (!required.has(name) && fallback !== undefined && same(value, fallback)) continue;
        out[name] = value;
      }
      return out;
    },
  };
}

/**
 * Show a 422's errors next to their fields: each error goes to the deepest element whose
 * `data-error-for` is a prefix of its loc; those that match none go to `fallback`.
 */
export function showErrors(form, errors, fallback) {
  clearErrors(form);
  const slots = new Map([...form.querySelectorAll("[data-error-for]")].map((el) => [el.dataset.errorFor, el]));
  const unplaced = [];
  for (const error of errors || []) {
    const loc = (error.loc || []).filter((part) => part !== "body").map(String);
    let slot = null;
    for (let n = loc.length; n > 0 && !slot; n -= 1) slot = slots.get(loc.slice(0, n).join(".")) || null;
    if (!slot) {
      unplaced.push(error);
      continue;
    }
    slot.append(h("p", { class: "error", role: "alert", "data-loc": loc.join(".") }, error.msg || "invalid"));
    const field = slot.closest("[data-field]") || slot.parentElement;
    if (field) field.classList.add("has-error");
  }
  if (fallback) replace(fallback, unplaced.length ? h("ul", { class: "errors-unplaced" }, unplaced.map((e) => h("li", {}, h("code", {}, (e.loc || []).join(".") || "spec"), ": ", e.msg))) : null);
  const first = form.querySelector(".has-error input, .has-error select, .has-error textarea");
  if (first) first.focus();
}

export function clearErrors(form) {
  form.querySelectorAll("[data-error-for]").forEach((el) => replace(el));
  form.querySelectorAll(".has-error").forEach((el) => el.classList.remove("has-error"));
}

/** A labelled row around a control, with its error slot. */
export function row(label, ctl, loc, help) {
  const id = ctl.el.id || nextId("f");
  ctl.el.id = id;
  return h(
    "div",
    { class: "field", "data-field": locKey(loc) },
    h("label", { for: id }, label),
    ctl.el,
    help ? h("small", { class: "muted" }, help) : null,
    h("div", { class: "field-error", "data-error-for": locKey(loc) }),
  );
}

export { nextId };
