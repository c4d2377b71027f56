// Admin: the model versions TorchServe serves. Auditor: the audit trail (ids only, never PHI).

import { describe, getJSON } from "./api.js";
import { clear, field, formatTime, h, message } from "./dom.js";

export async function modelsView(root) {
  root.append(h("h1", {}, "Model versions"));
  let data;
  try {
    data = await getJSON("/models");
  } catch (error) {
    if (error.status === 401) throw error;
    root.append(message("error", describe(error)));
    return;
  }
  root.append(
    h("p", {}, `Model ${data.model}; default version ${data.default_version || "none"}. `,
      "Versions are registered, promoted and rolled back with the models command-line tool."),
    h("table", { class: "list" },
      h("caption", { class: "visually-hidden" }, "Model versions"),
      h("thead", {}, h("tr", {}, ["Version", "Default", "Workers ready", "Batch size", "Batch delay"].map((t) => h("th", { scope: "col" }, t)))),
      h("tbody", {}, data.versions.map((v) => h("tr", {},
        h("td", {}, v.version),
        h("td", {}, v.default ? h("strong", {}, "default") : ""),
        h("td", {}, `${v.ready_workers} of ${v.workers}`),
        h("td", {}, v.batch_size ?? ""),
        h("td", {}, v.max_batch_delay_ms == null ? "" : `${v.max_batch_delay_ms} ms`))))));
}

const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;

export async function auditView(root) {
  const patient = h("input", { autocomplete: "off", spellcheck: "false", size: 38 });
  const status = h("div", { "aria-live": "polite" });
  const rows = h("tbody");
  const more = h("button", { type: "button", class: "secondary", hidden: true }, "Show older events");
  let cursor = null;
  let filter = {};

  async function load(reset) {
    if (reset) { rows.replaceChildren(); cursor = null; }
    clear(status);
    try {
      const page = await getJSON("/audit-events", { query: { limit: 50, cursor, ...filter } });
      for (const e of page.items) {
        rows.append(h("tr", { class: e.outcome === "success" ? "" : "warn" },
          h("td", {}, formatTime(e.at)), h("td", {}, e.action), h("td", {}, e.outcome),
          h("td", { class: "mono" }, e.actor_prefix || ""), h("td", { class: "mono" }, e.patient_id || ""),
          h("td", { class: "mono" }, e.resource_id || ""), h("td", { class: "mono" }, e.request_id)));
      }
      cursor = page.next_cursor;
      more.hidden = !cursor;
      if (!rows.children.length) status.append(h("p", {}, "No events."));
    } catch (error) {
      if (error.status === 401) throw error;
      status.append(message("error", describe(error)));
    }
  }

  const form = h("form", { class: "inline", novalidate: true },
    field("Patient id (optional)", patient, "A patient's id narrows the trail to that patient."),
    h("button", { type: "submit" }, "Show events"));
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const value = patient.value.trim();
    if (value && !UUID.test(value)) { clear(status, message("error", "A patient id looks like 3f2c…-…: 36 characters.")); return; }
    filter = value ? { patient_id: value } : {};
    load(true);
  });
  more.addEventListener("click", () => load(false));
  root.append(h("h1", {}, "Audit trail"),
    h("p", {}, "Who read or changed which patient's data, and when; newest first. Events hold ids, never names."),
    form, status,
    h("div", { class: "scroll" }, h("table", { class: "list" },
      h("caption", { class: "visually-hidden" }, "Audit events"),
      h("thead", {}, h("tr", {}, ["Time", "Action", "Outcome", "Key", "Patient", "Resource", "Request"].map((t) => h("th", { scope: "col" }, t)))),
      rows)), more);
  await load(true);
}
