// The console's shell: sign-in, navigation by role, and the hash router. Routes carry ids only
// (never a name or record number), and the hash is never sent to the server anyway.

import { describe, probeRole, session, whenUnauthorized } from "./api.js";
import { clear, field, go, h, message } from "./dom.js";
import { patientsView, patientView } from "./patients.js";
import { examView } from "./exam.js";
import { auditView, modelsView } from "./admin.js";

const main = document.getElementById("main");
const CLINICAL = ["clinician", "admin"];
const AUDIT = ["auditor", "admin"];
let signInNotice = null;
let leaving = () => {};

whenUnauthorized(() => {
  if (!session.get()) return;
  session.clear();
  signInNotice = "The API refused your key (it may have been revoked): sign in again.";
  go("#/sign-in");
});

function home(role) {
  return CLINICAL.includes(role) ? "#/patients" : "#/audit";
}

function shell() {
  const s = session.get();
  const nav = document.getElementById("nav");
  const who = document.getElementById("who");
  clear(nav);
  clear(who);
  if (!s) return;
  const links = [];
  if (CLINICAL.includes(s.role)) links.push(["#/patients", "Patients"]);
  if (s.role === "admin") links.push(["#/models", "Model versions"]);
  if (AUDIT.includes(s.role)) links.push(["#/audit", "Audit trail"]);
  const here = location.hash.split("/").slice(0, 2).join("/");
  nav.append(h("ul", {}, links.map(([href, text]) =>
    h("li", {}, h("a", { href, "aria-current": here === href ? "page" : null }, text)))));
  who.append(h("span", { class: "role" }, `Signed in as ${s.role}`),
    h("button", { type: "button", class: "secondary", onclick: signOut }, "Sign out"));
}

function signOut() {
  session.clear();
  signInNotice = "You are signed out. The key was removed from this tab.";
  go("#/sign-in");
}

function signInView(root) {
  const key = h("input", { type: "password", name: "key", autocomplete: "off", spellcheck: "false", required: true });
  const status = h("div", { class: "form-status", "aria-live": "polite" });
  const button = h("button", { type: "submit" }, "Sign in");
  const form = h("form", { class: "card narrow", "aria-labelledby": "signin-title", novalidate: true },
    h("h1", { id: "signin-title" }, "Sign in"),
    h("p", {}, "Paste the API key you were given (it starts with cic_). It is kept for this browser tab only and removed when you sign out or close the tab."),
    signInNotice ? message("info", signInNotice) : null,
    field("API key", key),
    button, status);
  signInNotice = null;
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const value = key.value.trim();
    if (!value) { clear(status, message("error", "Paste an API key first.")); key.focus(); return; }
    button.disabled = true;
    clear(status, message("info", "Checking the key…"));
    try {
      const role = await probeRole(value);
      session.save(value, role);
      go(home(role));
    } catch (error) {
      clear(status, message("error", error.status === 401 ? `This key was refused: ${error.message}` : describe(error)));
      key.focus();
    } finally {
      button.disabled = false;
    }
  });
  root.append(form);
  key.focus();
}

const ROUTES = [
  [/^#\/patients$/, CLINICAL, (root) => patientsView(root)],
  [/^#\/patients\/([0-9a-f-]{36})$/, CLINICAL, (root, m) => patientView(root, m[1])],
  [/^#\/patients\/([0-9a-f-]{36})\/exams\/([0-9a-f-]{36})$/, CLINICAL, (root, m) => examView(root, m[1], m[2])],
  [/^#\/models$/, ["admin"], (root) => modelsView(root)],
  [/^#\/audit$/, AUDIT, (root) => auditView(root)],
];

async function route() {
  leaving();
  leaving = () => {};
  const s = session.get();
  const hash = location.hash || "#/";
  clear(main);
  if (!s) {
    if (hash !== "#/sign-in") { history.replaceState(null, "", "#/sign-in"); }
    shell();
    signInView(main);
    return;
  }
  shell();
  const match = ROUTES.map(([re, roles, view]) => [hash.match(re), roles, view]).find(([m]) => m);
  if (!match) { go(home(s.role)); return; }
  const [m, roles, view] = match;
  if (!roles.includes(s.role)) {
    main.append(message("error", `The ${s.role} role cannot open this page.`));
    return;
  }
  // A view renders into its own box: when the user moves on before it has loaded, the box is
  // already detached and whatever arrives late lands nowhere.
  const root = h("div", { class: "view" });
  main.append(root);
  try {
    leaving = (await view(root, m)) || (() => {});
  } catch (error) {
    if (error.status === 401) return; // whenUnauthorized moved to sign-in
    root.append(message("error", describe(error)));
  }
  if (!root.isConnected) return;
  const heading = root.querySelector("h1");
  if (heading) { heading.tabIndex = -1; heading.focus({ preventScroll: true }); }
}

window.addEventListener("hashchange", route);
route();
