// One visit: its outcome, each eye's result and photographs, uploads, the Grad-CAM overlay, and
// the report and FHIR downloads. Every clinical word on this screen (grade, outcome, quality
// reasons, disclaimer) is the API's own text: the console adds none of its own.

import { describe, getBlob, getJSON, newIdempotencyKey, upload } from "./api.js";
import { clear, field, formatTime, h, message, uid } from "./dom.js";
import { disclaimerBanner, patientHeader } from "./patients.js";

const EYES = [["right", "Right eye"], ["left", "Left eye"]]; // right first, as on a fundus report
const FIELDS = [["disc", "Disc-centred"], ["macula", "Macula-centred"], ["other", "Other"]];
const FIELD_NAMES = Object.fromEntries(FIELDS);
const ACCEPT = "image/jpeg,image/png,image/tiff,application/dicom,.dcm,.jpg,.jpeg,.png,.tif,.tiff";
const STATUS_TEXT = {
  graded: "Graded",
  ungradable: "Ungradable photograph",
  pending: "Grading in progress",
  failed: "Grading failed",
  missing: "No photograph yet",
};

const apiPath = (url) => url.replace(/^\/api\/v1/, "");

function reasonsOf(list) {
  return (list || []).map((r) => (typeof r === "string" ? r : r.message || r.code)).filter(Boolean);
}

export async function examView(root, patientId, examId) {
  const base = `/patients/${patientId}/exams/${examId}`;
  const [patient, first] = await Promise.all([getJSON(`/patients/${patientId}`), getJSON(base)]);
  let exam = first;
  let stopped = false;
  let timer = null;
  const blobs = new Map(); // API path -> object URL, revoked when the view is left
  const awaiting = new Map(); // photograph id -> its upload's status line, while grading is pending

  async function objectUrl(path) {
    if (!blobs.has(path)) blobs.set(path, getBlob(path).then((b) => URL.createObjectURL(b)));
    try {
      return await blobs.get(path);
    } catch (error) {
      blobs.delete(path);
      throw error;
    }
  }

  const summary = h("section", { class: "card summary", "aria-labelledby": "outcome-title" });
  const panels = Object.fromEntries(EYES.map(([eye, title]) => [eye, eyePanel(eye, title)]));
  root.append(
    h("p", { class: "crumbs" }, h("a", { href: "#/patients" }, "Patients"), " › ",
      h("a", { href: `#/patients/${patientId}` }, patient.name), " › Visit"),
    h("h1", {}, `Visit of ${formatTime(exam.performed_at)}`),
    h("p", { class: "lead" }, patient.name),
    patientHeader(patient),
    summary,
    h("div", { class: "eyes" }, EYES.map(([eye]) => panels[eye].el)));

  function renderSummary() {
    const downloads = h("div", { class: "downloads" },
      h("button", { type: "button", onclick: (e) => download(e.currentTarget, `${base}/report`, `visit-${examId}.pdf`) },
        "Download the PDF report"),
      h("button", { type: "button", class: "secondary", onclick: (e) => download(e.currentTarget, `${base}/fhir`, `visit-${examId}.fhir.json`) },
        "Download the FHIR Bundle"),
      h("span", { class: "download-status", role: "status", "aria-live": "polite" }));
    const model = exam.model ? `Model ${exam.model.name} ${exam.model.version}` : "No model has graded this visit yet.";
    const empty = !exam.images.length;
    clear(summary,
      h("h2", { id: "outcome-title" }, "Outcome"),
      exam.disclaimer ? disclaimerBanner(exam.disclaimer) : null,
      empty
        ? h("p", { class: "outcome empty" }, "No photographs yet: add one or two photographs of each eye below.")
        : h("p", { class: `outcome ${exam.outcome}`, "data-outcome": exam.outcome }, exam.message),
      h("p", { class: "meta" }, model, exam.accession_number ? ` · Accession ${exam.accession_number}` : ""),
      empty ? null : downloads);
  }

  async function download(button, path, filename) {
    const status = button.parentElement.querySelector(".download-status");
    button.disabled = true;
    status.textContent = "Preparing…";
    try {
      const blob = await getBlob(path);
      const url = URL.createObjectURL(blob);
      const a = h("a", { href: url, download: filename, hidden: true });
      document.body.append(a);
      a.click();
      a.remove();
      setTimeout(() => URL.revokeObjectURL(url), 60000);
      status.textContent = `Downloaded ${filename}.`;
    } catch (error) {
      status.textContent = "";
      status.append(message("error", describe(error)));
    } finally {
      button.disabled = false;
    }
  }

  function eyePanel(eye, title) {
    const titleId = uid("eye");
    const result = h("div", { class: "result", "aria-live": "polite" });
    const thumbs = h("div", { class: "thumbs", role: "group", "aria-label": `Photographs of the ${title.toLowerCase()}` });
    const photo = h("img", { class: "photo", alt: "" });
    // The API's explanation is one PNG: the photograph with the Grad-CAM map already blended in,
    // and a colour scale under it. The top part is drawn over the photograph (so the slider fades
    // between the plain photograph and the API's picture) and the scale beneath it.
    const overlay = h("canvas", { class: "overlay", role: "img", hidden: true });
    // The API's own scale strip is cropped off (its small print is unreadable once the picture
    // is scaled to the panel); this legend says the same in the page's own type.
    const scale = h("div", { class: "scale", hidden: true },
      h("span", { class: "ramp", "aria-hidden": "true" }),
      h("span", { class: "ends" }, h("span", {}, "low attention"), h("span", {}, "high attention")));
    const caption = h("figcaption");
    const show = h("input", { type: "checkbox", checked: true });
    const opacity = h("input", { type: "range", min: 0, max: 100, step: 5, value: 100 });
    const overlayNote = h("p", { class: "hint", "aria-live": "polite" });
    const controls = h("div", { class: "controls" },
      h("div", { class: "check" }, show, h("label", { for: show.id = uid("show") }, "Show the Grad-CAM overlay (where the model looked)")),
      field("Overlay opacity", opacity));
    const figure = h("figure", { class: "viewer", hidden: true },
      h("div", { class: "stack" }, photo, overlay), scale, caption, controls, overlayNote);
    const el = h("section", { class: `card eye eye-${eye}`, "aria-labelledby": titleId, "data-eye": eye },
      h("h2", { id: titleId }, title), result, figure, thumbs, uploader(eye, title));
    let selected = null;
    let chosen = false; // the user picked a photograph: keep it; otherwise follow the deciding one
    let drawn = false;

    const applyOverlay = () => {
      overlay.style.opacity = String(opacity.value / 100);
      opacity.setAttribute("aria-valuetext", `${opacity.value} percent`);
      opacity.disabled = !show.checked;
      overlay.hidden = !show.checked || !drawn;
      scale.hidden = overlay.hidden;
      overlay.dataset.state = drawn ? (overlay.hidden ? "off" : "on") : "none";
    };
    show.addEventListener("change", () => { applyOverlay(); if (show.checked && selected && !drawn) loadOverlay(selected); });
    opacity.addEventListener("input", applyOverlay);

    function draw(img) {
      // Where the picture ends and the scale begins: the picture keeps the photograph's aspect.
      const w = img.naturalWidth, total = img.naturalHeight;
      let top = total;
      if (photo.naturalWidth && photo.naturalHeight) {
        const guess = Math.round(w * photo.naturalHeight / photo.naturalWidth);
        if (guess > 0 && guess <= total && total - guess < total * 0.4) top = guess;
      }
      overlay.width = w;
      overlay.height = top;
      overlay.getContext("2d").drawImage(img, 0, 0, w, top, 0, 0, w, top);
      overlay.setAttribute("aria-label", `Grad-CAM overlay on the ${title.toLowerCase()}: the regions that weighed most in the grade`);
      drawn = true;
    }

    async function loadOverlay(image) {
      overlayNote.textContent = "";
      drawn = false;
      applyOverlay();
      controls.hidden = image.status !== "graded";
      if (image.status !== "graded") {
        overlayNote.textContent = "No overlay: this photograph has no grade.";
        return;
      }
      if (!show.checked) return;
      overlayNote.textContent = "Loading the overlay…";
      try {
        const url = await objectUrl(`/patients/${patientId}/screenings/${image.id}/explanation`);
        const img = new Image();
        img.src = url;
        await img.decode();
        try { await photo.decode(); } catch { /* not shown (e.g. TIFF): the overlay alone */ }
        if (!selected || selected.id !== image.id) return;
        draw(img);
        overlayNote.textContent = "";
      } catch (error) {
        if (error.status === 401 || !selected || selected.id !== image.id) return;
        overlayNote.textContent = `No overlay: ${describe(error)}`;
      }
      applyOverlay();
    }

    async function select(image) {
      selected = image;
      for (const b of thumbs.querySelectorAll("button")) b.setAttribute("aria-pressed", String(b.dataset.id === image.id));
      figure.hidden = false;
      caption.textContent = `${FIELD_NAMES[image.field] || "Photograph"} · ${STATUS_TEXT[image.status] || image.status}` +
        (image.result && image.result.label ? ` · ${image.result.label}` : "");
      photo.alt = `${FIELD_NAMES[image.field] || ""} photograph of the ${title.toLowerCase()}`.trim();
      photo.removeAttribute("src");
      drawn = false;
      applyOverlay();
      try {
        const url = await objectUrl(apiPath(image.image.url) + "?redirect=false");
        if (selected && selected.id === image.id) photo.src = url;
      } catch (error) {
        if (error.status !== 401) overlayNote.textContent = `The photograph could not be shown: ${describe(error)}`;
      }
      loadOverlay(image);
    }

    function render() {
      const info = (exam.eyes && exam.eyes[eye]) || { status: "missing" };
      const images = exam.images.filter((i) => i.eye === eye);
      const parts = [h("p", { class: `eye-status ${info.status}` }, STATUS_TEXT[info.status] || info.status)];
      if (info.status === "graded") {
        parts.push(h("p", { class: "grade" }, "Grade: ", h("strong", {}, info.label)),
          h("p", {}, `Referable: ${info.referable ? "yes" : "no"}`));
      }
      const reasons = reasonsOf(info.quality_reasons);
      if (info.status === "ungradable" || reasons.length) {
        const perImage = reasons.length ? reasons
          : images.flatMap((i) => reasonsOf(i.result && i.result.quality && i.result.quality.reasons));
        if (perImage.length) {
          parts.push(h("p", { class: "reasons-title" }, "Why the photograph could not be graded:"),
            h("ul", { class: "reasons" }, [...new Set(perImage)].map((r) => h("li", {}, r))));
        }
      }
      clear(result, parts);
      clear(thumbs, images.map((image, n) => h("button", {
        type: "button", class: `thumb ${image.status}`, "data-id": image.id,
        "aria-pressed": String(selected && selected.id === image.id),
        onclick: () => { chosen = true; select(image); },
      }, `${n + 1}. ${FIELD_NAMES[image.field] || "Photograph"}: ${STATUS_TEXT[image.status] || image.status}`,
        image.id === info.deciding_image_id ? " (decided the grade)" : "")));
      const deciding = images.find((i) => i.id === info.deciding_image_id);
      const keep = selected && (chosen || !deciding) && images.find((i) => i.id === selected.id);
      const next = keep || deciding || images[images.length - 1];
      if (!next) { figure.hidden = true; selected = null; return; }
      if (!selected || next.id !== selected.id || next.status !== selected.status) select(next);
      else selected = next;
    }

    return { el, render };
  }

  function uploader(eye, title) {
    const input = h("input", { type: "file", accept: ACCEPT, multiple: true, class: "file" });
    const fieldSelect = h("select", {}, FIELDS.map(([v, t]) => h("option", { value: v }, t)));
    const list = h("ul", { class: "uploads" });
    const zone = h("div", { class: "dropzone" },
      h("p", {}, "Drop one or two photographs here (JPEG, PNG, TIFF or DICOM), or"),
      h("label", { class: "button", for: input.id = uid("file") }, `Choose photographs of the ${title.toLowerCase()}`),
      input);
    zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
    zone.addEventListener("dragleave", () => zone.classList.remove("over"));
    zone.addEventListener("drop", (e) => {
      e.preventDefault();
      zone.classList.remove("over");
      send([...e.dataTransfer.files]);
    });
    input.addEventListener("change", () => { send([...input.files]); input.value = ""; });

    function send(files) {
      for (const file of files) sendOne(file, fieldSelect.value);
    }

    function sendOne(file, fieldValue, idempotencyKey = newIdempotencyKey()) {
      const progress = h("progress", { max: 100, value: 0, "aria-label": `Upload of ${file.name}` });
      const status = h("span", { class: "upload-status" }, "Uploading…");
      const item = h("li", { class: "upload" }, h("span", { class: "name" }, file.name), progress, status);
      list.append(item);
      const form = new FormData();
      form.append("eye", eye);
      form.append("field", fieldValue);
      form.append("image", file, file.name);
      upload(`${base}/images`, form, {
        idempotencyKey,
        onProgress: (fraction) => { progress.value = Math.round(fraction * 100); },
        onRetry: (attempt) => { status.textContent = `Connection lost: retrying (${attempt})…`; },
      }).then(({ status: code, body }) => {
        progress.value = 100;
        item.classList.add("done");
        if (body && body.status === "ungradable") item.classList.add("ungradable");
        if (code === 202 && body && body.id) awaiting.set(body.id, { item, status });
        status.textContent = code === 202 ? "Stored; grading pending."
          : body && body.status === "ungradable" ? "Stored; it could not be graded (see the eye's result)."
          : "Stored and graded.";
        refresh();
      }, (error) => {
        item.classList.add("failed");
        clear(status, message("error", describe(error)));
        if (error.status === 0) {
          // Still unknown whether the server got it: the same key makes a retry safe.
          status.append(h("button", { type: "button", class: "small", onclick: () => { item.remove(); sendOne(file, fieldValue, idempotencyKey); } }, "Try again"));
        }
      });
    }

    return h("div", { class: "uploader" },
      h("h3", {}, "Add photographs"),
      field("Field of the photographs", fieldSelect), zone, list);
  }

  function render() {
    for (const image of exam.images) {
      const upload = awaiting.get(image.id);
      if (!upload || image.status === "pending") continue;
      awaiting.delete(image.id);
      upload.status.textContent = image.status === "graded" ? "Graded."
        : image.status === "ungradable" ? "It could not be graded (see the eye's result)." : `Grading ${image.status}.`;
      if (image.status !== "graded") upload.item.classList.add("ungradable");
    }
    renderSummary();
    for (const [eye] of EYES) panels[eye].render();
    clearTimeout(timer);
    const pending = exam.outcome === "pending" || exam.images.some((i) => i.status === "pending");
    if (pending && !stopped) timer = setTimeout(refresh, 3000);
  }

  async function refresh() {
    if (stopped) return;
    try {
      exam = await getJSON(base);
      if (!stopped) render();
    } catch (error) {
      if (error.status !== 401 && !stopped) summary.append(message("error", describe(error)));
    }
  }

  render();
  return () => {
    stopped = true;
    clearTimeout(timer);
    for (const pending of blobs.values()) pending.then((url) => URL.revokeObjectURL(url), () => {});
  };
}
