// Finding a patient and their visits.
//
// The API lists patients page by page and has no search parameter, on purpose: a name or record
// number in a URL ends up in access logs and proxies. So the console loads the list (names come
// back in response bodies only) and filters it in the browser as you type. Nothing typed into the
// search box leaves the page.

import { all, describe, getJSON, newIdempotencyKey, postJSON } from "./api.js";
import { clear, field, formatDate, formatTime, go, h, message } from "./dom.js";

const SEXES = [["", "Not given"], ["female", "Female"], ["male", "Male"], ["other", "Other"], ["unknown", "Unknown"]];

function fold(text) {
  return (text || "").normalize("NFD").replace(/[\u0300-\u036f]/g, "").toLowerCase();
}

function matches(patient, words) {
  const hay = fold([patient.name, patient.medical_record_number, patient.birth_date].join(" "));
  return words.every((w) => hay.includes(w));
}

export async function patientsView(root) {
  const search = h("input", { type: "search", autocomplete: "off", spellcheck: "false" });
  const results = h("div", { class: "results" });
  const count = h("p", { class: "count", role: "status", "aria-live": "polite" });
  root.append(
    h("h1", {}, "Patients"),
    h("div", { class: "columns" },
      h("section", { class: "card", "aria-labelledby": "find-title" },
        h("h2", { id: "find-title" }, "Find a patient"),
        field("Name, record number or birth date", search,
          "Searched on this page only: what you type is never sent to the server."),
        count, results),
      newPatientForm()));

  let patients = [];
  let complete = true;
  const render = () => {
    const words = fold(search.value).split(/\s+/).filter(Boolean);
    const shown = words.length ? patients.filter((p) => matches(p, words)) : patients.slice(0, 50);
    count.textContent = words.length
      ? `${shown.length} of ${patients.length} patients match.`
      : `${patients.length} patients${complete ? "" : " (the first ones)"}; type to search.`;
    if (!shown.length) { clear(results, h("p", {}, words.length ? "No patient matches." : "No patients yet.")); return; }
    clear(results, h("table", { class: "list" },
      h("caption", { class: "visually-hidden" }, "Patients"),
      h("thead", {}, h("tr", {}, ["Name", "Birth date", "Record number"].map((t) => h("th", { scope: "col" }, t)))),
      h("tbody", {}, shown.slice(0, 200).map((p) => h("tr", {},
        h("td", {}, h("a", { href: `#/patients/${p.id}` }, p.name)),
        h("td", {}, formatDate(p.birth_date)),
        h("td", {}, p.medical_record_number || ""))))));
  };
  search.addEventListener("input", render);
  count.textContent = "Loading patients…";
  ({ items: patients, complete } = await all("/patients"));
  patients.sort((a, b) => a.name.localeCompare(b.name));
  render();
}

function newPatientForm() {
  const name = h("input", { name: "name", required: true, autocomplete: "off", maxlength: 200 });
  const birth = h("input", { name: "birth_date", type: "date", max: new Date().toISOString().slice(0, 10), min: "1900-01-01" });
  const mrn = h("input", { name: "medical_record_number", autocomplete: "off", maxlength: 64 });
  const sex = h("select", { name: "sex" }, SEXES.map(([v, t]) => h("option", { value: v }, t)));
  const status = h("div", { class: "form-status", "aria-live": "polite" });
  const button = h("button", { type: "submit" }, "Create patient");
  const form = h("form", { class: "card", "aria-labelledby": "new-patient-title", novalidate: true },
    h("h2", { id: "new-patient-title" }, "New patient"),
    field("Name", name), field("Birth date", birth), field("Medical record number", mrn, "Optional; must be unique."),
    field("Sex", sex), button, status);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    if (!name.value.trim()) { clear(status, message("error", "Give the patient's name.")); name.focus(); return; }
    const body = { name: name.value.trim() };
    if (birth.value) body.birth_date = birth.value;
    if (mrn.value.trim()) body.medical_record_number = mrn.value.trim();
    if (sex.value) body.sex = sex.value;
    button.disabled = true;
    try {
      const patient = await postJSON("/patients", body);
      go(`#/patients/${patient.id}`);
    } catch (error) {
      clear(status, message("error", describe(error)));
    } finally {
      button.disabled = false;
    }
  });
  return form;
}

export function patientHeader(patient) {
  const facts = [
    ["Birth date", formatDate(patient.birth_date) || "not given"],
    ["Record number", patient.medical_record_number || "not given"],
    ["Sex", patient.sex || "not given"],
  ];
  return h("dl", { class: "facts" }, facts.map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]));
}

export function disclaimerBanner(text) {
  return h("aside", { class: "disclaimer", role: "note", "aria-label": "Model disclaimer" },
    h("strong", {}, "Disclaimer: "), text);
}

export async function patientView(root, patientId) {
  const [patient, exams] = await Promise.all([
    getJSON(`/patients/${patientId}`),
    getJSON(`/patients/${patientId}/exams`, { query: { limit: 20 } }),
  ]);
  const list = h("div", { class: "visits" });
  const more = h("button", { type: "button", class: "secondary" }, "Show older visits");
  let cursor = exams.next_cursor;
  const rows = h("tbody");
  const disclaimers = new Set();
  const banner = h("div");
  const addRows = (items) => {
    for (const exam of items) {
      if (exam.disclaimer) disclaimers.add(exam.disclaimer);
      rows.append(h("tr", {},
        h("td", {}, h("a", { href: `#/patients/${patientId}/exams/${exam.id}` }, formatTime(exam.performed_at))),
        h("td", {}, h("span", { class: `badge ${exam.outcome}` }, exam.message)),
        h("td", {}, `${exam.images.length} photograph${exam.images.length === 1 ? "" : "s"}`)));
    }
    clear(banner, [...disclaimers].map(disclaimerBanner));
  };
  addRows(exams.items);
  if (exams.items.length) {
    list.append(banner, h("table", { class: "list" },
      h("caption", { class: "visually-hidden" }, "Visits, newest first"),
      h("thead", {}, h("tr", {}, ["Visit", "Outcome", "Photographs"].map((t) => h("th", { scope: "col" }, t)))), rows));
  } else {
    list.append(h("p", {}, "No visits yet."));
  }
  more.hidden = !cursor;
  more.addEventListener("click", async () => {
    const page = await getJSON(`/patients/${patientId}/exams`, { query: { limit: 20, cursor } });
    addRows(page.items);
    cursor = page.next_cursor;
    more.hidden = !cursor;
  });
  root.append(
    h("p", { class: "crumbs" }, h("a", { href: "#/patients" }, "Patients"), " › ", patient.name),
    h("h1", {}, patient.name),
    patientHeader(patient),
    h("div", { class: "columns" },
      h("section", { class: "card", "aria-labelledby": "visits-title" },
        h("h2", { id: "visits-title" }, "Visits"), list, more),
      newExamForm(patientId)));
}

function localNow() {
  const d = new Date();
  d.setMinutes(d.getMinutes() - d.getTimezoneOffset());
  return d.toISOString().slice(0, 16);
}

function newExamForm(patientId) {
  const when = h("input", { type: "datetime-local", value: localNow(), required: true });
  const accession = h("input", { autocomplete: "off", maxlength: 64 });
  const status = h("div", { class: "form-status", "aria-live": "polite" });
  const button = h("button", { type: "submit" }, "Start the visit");
  let idempotencyKey = newIdempotencyKey(); // a double click or a retry opens one visit, not two
  const form = h("form", { class: "card", "aria-labelledby": "new-visit-title", novalidate: true },
    h("h2", { id: "new-visit-title" }, "New visit"),
    field("Time of the visit", when), field("Accession number", accession, "Optional: the visit's number in your clinic's system."),
    button, status);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const body = {};
    if (when.value) body.performed_at = new Date(when.value).toISOString();
    if (accession.value.trim()) body.accession_number = accession.value.trim();
    button.disabled = true;
    try {
      const exam = await postJSON(`/patients/${patientId}/exams`, body, { extraHeaders: { "Idempotency-Key": idempotencyKey } });
      go(`#/patients/${patientId}/exams/${exam.id}`);
    } catch (error) {
      if (error.status) idempotencyKey = newIdempotencyKey(); // refused: the next try is a new request
      clear(status, message("error", describe(error)));
    } finally {
      button.disabled = false;
    }
  });
  return form;
}
