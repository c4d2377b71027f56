"""The clinician console (/console) in a real browser: Playwright driving Debian's Chromium
against the real stack (gunicorn, TorchServe, PostgreSQL, SeaweedFS S3).

Every page is checked with axe-core (the copy bundled in the pinned axe-playwright-python
wheel, evaluated into the page by the test, never fetched), and every request the page makes must
go to the API's own origin. Screenshots land in var/console-screenshots/ (path printed).
"""
from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SHOTS = REPO / "var" / "console-screenshots"
SAMPLES = REPO / "samples"
TIMEOUT_MS = 90_000

playwright_api = pytest.importorskip("playwright.sync_api")
expect = playwright_api.expect
expect.set_options(timeout=TIMEOUT_MS)  # uploads are graded by TorchServe on 2 shared cores


def _axe_script() -> str:
    import axe_playwright_python

    return (Path(axe_playwright_python.__file__).parent / "axe.min.js").read_text()


@pytest.fixture(scope="module")
def browser():
    chromium = shutil.which("chromium")
    if not chromium:
        message = "Debian's chromium is not installed (apt-get install chromium)"
        if os.environ.get("CLARITY_REQUIRE_SERVICES"):  # .ci/run installs it: never skip in CI
            pytest.fail(message)
        pytest.skip(message)
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def stack(make_stack):
    return make_stack(name="console")


@pytest.fixture(scope="module")
def keys(stack) -> dict:
    return {role: stack.key(role)["Authorization"].split(" ", 1)[1] for role in ("clinician", "admin", "auditor")}


class Console:
    """One browser context on the console, recording every request and page error."""

    def __init__(self, browser, stack, name: str, width=1280, height=800):
        self.stack, self.name = stack, name
        self.origin = "{0.scheme}://{0.netloc}".format(urlsplit(stack.url))
        self.context = browser.new_context(viewport={"width": width, "height": height}, accept_downloads=True)
        self.context.set_default_timeout(TIMEOUT_MS)
        self.requests: list[str] = []
        self.foreign: list[str] = []
        self.errors: list[str] = []
        self.context.route("**/*", self._guard)
        self.page = self.context.new_page()
        self.page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        self.shots = 0

    def _guard(self, route):
        url = route.request.url
        self.requests.append(url)
        if url.startswith(("blob:", "data:")) or url.startswith(self.origin + "/"):
            route.continue_()
        else:  # never let it out; the test fails on it below
            self.foreign.append(url)
            route.abort("blockedbyclient")

    def open(self, hash_: str = ""):
        self.page.goto(f"{self.stack.url}/console/{hash_}")

    def sign_in(self, key: str):
        self.open()
        self.page.get_by_label("API key").fill(key)
        self.page.get_by_role("button", name="Sign in").click()

    def axe(self, label: str):
        """No serious or critical axe-core violations on what the page shows now."""
        self.page.evaluate(_axe_script())
        result = self.page.evaluate(
            "axe.run(document, {resultTypes: ['violations'], runOnly: {type: 'tag', values: "
            "['wcag2a', 'wcag2aa', 'wcag21a', 'wcag21aa', 'best-practice']}})")
        bad = [f"{v['id']} ({v['impact']}): {v['help']} at {[n['target'] for n in v['nodes']][:3]}"
               for v in result["violations"] if v["impact"] in ("serious", "critical")]
        assert not bad, f"axe-core on {label}:\n" + "\n".join(bad)

    def shot(self, label: str) -> Path:
        SHOTS.mkdir(parents=True, exist_ok=True)
        self.shots += 1
        path = SHOTS / f"{self.name}-{self.shots:02d}-{label}.png"
        self.page.screenshot(path=str(path), full_page=True)
        print(f"screenshot: {path}")
        return path

    def close(self):
        self.context.close()
        assert not self.foreign, f"requests left the API's origin: {self.foreign}"
        assert not self.errors, f"errors in the page: {self.errors}"


@pytest.fixture
def console(browser, stack, request):
    opened = []

    name = request.node.name.removeprefix("test_")
    for old in SHOTS.glob(f"{name}-*.png"):  # an earlier run's pictures would mislead
        old.unlink()

    def make(width=1280, height=800):
        c = Console(browser, stack, name, width, height)
        opened.append(c)
        return c

    yield make
    for c in opened:
        try:
            c.shot("end")  # what the page showed last, also when the test failed
        except Exception as exc:  # the page may be gone; the checks below still run
            print(f"no end screenshot: {exc}")
        c.close()


def api(stack, key, method, path, **kw):
    return requests.request(method, f"{stack.url}/api/v1{path}", headers={"Authorization": f"Bearer {key}"},
                            timeout=60, **kw)


def dark_jpeg() -> bytes:
    from tests.support.images import darkened, encode, fundus_like

    return encode(darkened(fundus_like((640, 480), seed=7), 0.05))


def new_visit(c: Console, key: str, name: str) -> tuple[str, str]:
    """Signed in with `key`, a patient (made through the API) and a visit opened in the console:
    (patient id, exam id)."""
    c.sign_in(key)
    expect(c.page.get_by_role("heading", name="Patients")).to_be_visible()
    patient = api(c.stack, key, "POST", "/patients", json={"name": name, "birth_date": "1950-05-06"})
    assert patient.status_code == 201, patient.text
    pid = patient.json()["id"]
    c.open(f"#/patients/{pid}")
    c.page.get_by_role("button", name="Start the visit").click()
    expect(c.page.get_by_role("heading", name="Outcome")).to_be_visible()
    exam_id = c.page.url.rsplit("/", 1)[1]
    return pid, exam_id


def add_photos(c: Console, eye: str, field_label: str, files: list):
    panel = c.page.locator(f"section[data-eye={eye}]")
    panel.get_by_label("Field of the photographs").select_option(label=field_label)
    panel.locator("input[type=file]").set_input_files(files)
    return panel


def wait_settled(c: Console, stack, key, pid, exam_id, photos: int) -> dict:
    """Until every upload finished in the page and the exam is no longer pending."""
    expect(c.page.locator("li.upload:not(.done):not(.failed)")).to_have_count(0)
    expect(c.page.locator(".outcome:not(.pending)")).to_be_visible()
    exam = api(stack, key, "GET", f"/patients/{pid}/exams/{exam_id}").json()
    assert len(exam["images"]) == photos
    return exam


# ---------------------------------------------------------------------------------------- tests

def test_clinician_path(console, stack, keys, tmp_path):
    """Sign in, create a patient, find them by name, open a visit, upload two photographs of one
    eye and one of the other with progress bars, read each eye's result and the overlay, download
    the PDF and the FHIR Bundle, see the visit among earlier visits, at desktop and tablet width."""
    c = console()
    page = c.page
    key = keys["clinician"]
    c.open()
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    c.axe("sign-in")
    c.shot("sign-in")
    # Keyboard only: the key field has the focus, the skip link is one Shift+Tab away, Enter signs in.
    expect(page.get_by_label("API key")).to_be_focused()
    page.keyboard.press("Shift+Tab")
    expect(page.get_by_role("link", name="Skip to content")).to_be_focused()
    page.keyboard.press("Tab")
    page.keyboard.type(key)
    page.keyboard.press("Enter")
    expect(page.get_by_role("heading", name="Patients")).to_be_visible()
    assert page.evaluate("sessionStorage.length") == 1

    # A patient with PHI markers: the stack's teardown fails if they reach a log (or a URL in one).
    from tests.support.harness import phi_patient

    phi = phi_patient("console")
    page.get_by_label("Name", exact=True).fill(phi["name"])
    page.get_by_label("Birth date", exact=True).fill(phi["birth_date"])
    page.get_by_label("Medical record number").fill(phi["medical_record_number"])
    page.get_by_label("Sex").select_option("female")
    c.axe("patients")
    page.get_by_role("button", name="Create patient").click()
    expect(page.get_by_role("heading", name=phi["name"])).to_be_visible()
    pid = page.url.split("#/patients/")[1]

    # Find them again by part of the name: filtered in the page, never sent.
    page.get_by_role("link", name="Patients").first.click()
    search = page.get_by_label("Name, record number or birth date")
    search.fill("phimarker cons")
    expect(page.get_by_role("link", name=phi["name"])).to_be_visible()
    c.shot("patient-search")
    search.fill("nobody-by-this-name")
    expect(page.get_by_text("No patient matches.")).to_be_visible()
    search.fill(phi["medical_record_number"].lower())
    page.get_by_role("link", name=phi["name"]).click()
    expect(page.get_by_role("heading", name=phi["name"])).to_be_visible()
    assert not any("phimark" in u.lower() or "quenby" in u.lower() for u in c.requests), "PHI in a URL"

    page.get_by_label("Accession number").fill("ACC-PHIMARK-1")
    c.axe("patient")
    page.get_by_role("button", name="Start the visit").click()
    expect(page.get_by_role("heading", name="Outcome")).to_be_visible()
    exam_id = page.url.rsplit("/", 1)[1]

    samples = sorted(SAMPLES.glob("*.jpg"))
    add_photos(c, "right", "Disc-centred", [samples[0]])
    add_photos(c, "right", "Macula-centred", [samples[1]])
    add_photos(c, "left", "Disc-centred", [samples[2]])
    exam = wait_settled(c, stack, key, pid, exam_id, photos=3)
    # Each upload's progress bar reached the end.
    assert page.locator("li.upload progress").evaluate_all("bars => bars.map(b => b.value)") == [100, 100, 100]
    assert {(i["eye"], i["field"]) for i in exam["images"]} == {("right", "disc"), ("right", "macula"), ("left", "disc")}

    # The outcome and grades are the API's words; the synthetic disclaimer is on the screen.
    expect(page.locator(".outcome")).to_have_text(exam["message"])
    assert exam["disclaimer"] and "synthetic" in exam["disclaimer"].lower()
    expect(page.locator(".summary .disclaimer")).to_contain_text(exam["disclaimer"])
    for eye in ("right", "left"):
        result = exam["eyes"][eye]
        panel = page.locator(f"section[data-eye={eye}]")
        if result["status"] == "graded":
            expect(panel.locator(".grade strong")).to_have_text(result["label"])
        expect(panel.locator("img.photo")).to_have_attribute("src", _blob())

    # The Grad-CAM overlay of the right eye's deciding photograph: shown, faded, hidden.
    right = page.locator("section[data-eye=right]")
    # Unless the user picks another, each eye shows the photograph that decided its grade.
    for eye in ("right", "left"):
        if exam["eyes"][eye]["deciding_image_id"]:
            expect(page.locator(f"section[data-eye={eye}] .thumbs [aria-pressed=true]")).to_have_attribute(
                "data-id", exam["eyes"][eye]["deciding_image_id"])
    overlay = right.locator("canvas.overlay")
    if exam["eyes"]["right"]["status"] == "graded":
        expect(overlay).to_have_attribute("data-state", "on")
        expect(overlay).to_be_visible()
        expect(right.locator(".scale")).to_be_visible()
        slider = right.get_by_label("Overlay opacity")
        slider.fill("30")
        assert overlay.evaluate("o => o.style.opacity") == "0.3"
        c.shot("visit")
        toggle = right.get_by_label("Show the Grad-CAM overlay (where the model looked)")
        toggle.focus()
        page.keyboard.press("Space")
        expect(overlay).to_be_hidden()
        expect(slider).to_be_disabled()
        page.keyboard.press("Space")
        expect(overlay).to_be_visible()
    else:
        c.shot("visit")
    c.axe("visit")
    # The other photograph of the right eye, picked from the list, stays picked.
    other = right.locator(".thumbs button[aria-pressed=false]")
    expect(other).to_have_count(1)
    other.click()
    expect(right.locator(".thumbs button").nth(0)).to_have_attribute("aria-pressed", "false")
    expect(right.locator(".thumbs [aria-pressed=true]")).to_have_count(1)
    expect(right.locator("img.photo")).to_have_attribute("src", _blob())

    # Downloads: a PDF and a FHIR Bundle, named by ids only.
    with page.expect_download() as pdf_info:
        page.get_by_role("button", name="Download the PDF report").click()
    pdf = pdf_info.value
    assert pdf.suggested_filename == f"visit-{exam_id}.pdf"
    assert Path(pdf.path()).read_bytes()[:5] == b"%PDF-"
    with page.expect_download() as fhir_info:
        page.get_by_role("button", name="Download the FHIR Bundle").click()
    bundle = json.loads(Path(fhir_info.value.path()).read_text())
    assert bundle["resourceType"] == "Bundle"

    # Tablet width: one column, nothing wider than the screen.
    page.set_viewport_size({"width": 768, "height": 1024})
    expect(page.locator(".outcome")).to_be_visible()
    assert page.evaluate("document.documentElement.scrollWidth") <= 768
    c.shot("visit-tablet")
    page.set_viewport_size({"width": 1280, "height": 800})

    # Earlier visits of the patient list this one with its outcome.
    page.get_by_role("link", name=phi["name"]).click()
    expect(page.get_by_role("cell", name=exam["message"])).to_be_visible()
    c.shot("patient")

    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    assert page.evaluate("sessionStorage.length") == 0


def _blob():
    import re

    return re.compile(r"^blob:")


def test_ungradable_photograph(console, stack, keys):
    """A too-dark photograph: the eye says so with the quality gate's reasons; the outcome is the API's."""
    c = console()
    key = keys["clinician"]
    pid, exam_id = new_visit(c, key, "Ungradable Example")
    add_photos(c, "left", "Macula-centred", [{"name": "dark.jpg", "mimeType": "image/jpeg", "buffer": dark_jpeg()}])
    exam = wait_settled(c, stack, key, pid, exam_id, photos=1)
    assert exam["eyes"]["left"]["status"] == "ungradable"
    panel = c.page.locator("section[data-eye=left]")
    expect(panel.locator(".eye-status")).to_have_text("Ungradable photograph")
    reasons = [r["message"] for r in exam["eyes"]["left"]["quality_reasons"]]
    assert reasons
    for reason in reasons:
        expect(panel.locator(".reasons")).to_contain_text(reason)
    expect(panel.locator(".hint").filter(has_text="No overlay")).to_be_visible()
    expect(c.page.locator(".outcome")).to_have_text(exam["message"])
    expect(c.page.locator("section[data-eye=right] .eye-status")).to_have_text("No photograph yet")
    c.axe("ungradable")
    c.shot("ungradable")


def test_4xx_is_explained_and_nothing_is_stored(console, stack, keys):
    """A file that is no photograph: the API's 4xx message is shown, and the visit stays empty."""
    c = console()
    key = keys["clinician"]
    pid, exam_id = new_visit(c, key, "Refused Upload Example")
    add_photos(c, "right", "Disc-centred", [{"name": "notes.jpg", "mimeType": "image/jpeg",
                                             "buffer": b"these are clinic notes, not a photograph\n" * 20}])
    alert = c.page.locator("li.upload.failed [role=alert]")
    expect(alert).to_be_visible()
    exam = api(stack, key, "GET", f"/patients/{pid}/exams/{exam_id}").json()
    assert exam["images"] == []
    text = alert.inner_text()
    assert "request" in text  # the request id, for support
    assert any(hint in text for hint in ("not accepted", "could not be used", "kind of file")), text
    c.axe("4xx")
    c.shot("4xx")


def test_network_error_retries_with_the_same_idempotency_key(console, stack, keys):
    """The first upload reaches the API but its answer is lost: the page retries with the same
    Idempotency-Key, the API replays, and the visit has the photograph once."""
    c = console()
    key = keys["clinician"]
    pid, exam_id = new_visit(c, key, "Retry Example")
    seen = []

    def lose_first_answer(route):
        seen.append(route.request.headers.get("idempotency-key"))
        if len(seen) == 1:
            route.fetch()  # the API stores and grades it...
            route.abort("connectionreset")  # ...and the answer never arrives
        else:
            route.continue_()

    c.page.route("**/exams/*/images", lose_first_answer)
    add_photos(c, "right", "Disc-centred", [sorted(SAMPLES.glob("*.jpg"))[3]])
    exam = wait_settled(c, stack, key, pid, exam_id, photos=1)
    assert len(seen) == 2 and seen[0] and seen[0] == seen[1], seen
    assert exam["images"][0]["eye"] == "right"


def test_revoked_key_returns_to_sign_in(console, stack, keys):
    """A wrong key is refused at sign-in; a key revoked mid-session sends the user back to sign in."""
    c = console()
    page = c.page
    c.sign_in("cic_deadbeef_not-a-real-key")
    expect(page.get_by_role("alert")).to_contain_text("refused")
    c.axe("sign-in-refused")
    token = stack.key("clinician")["Authorization"].split(" ", 1)[1]
    c.sign_in(token)
    expect(page.get_by_role("heading", name="Patients")).to_be_visible()
    assert stack.cli("keys", "revoke", token.split("_")[1]).returncode == 0
    page.reload()  # the next call to the API answers 401
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    expect(page.get_by_text("sign in again")).to_be_visible()
    assert page.evaluate("sessionStorage.length") == 0
    c.shot("signed-out-401")


def test_admin_sees_model_versions_and_auditor_the_trail(console, stack, keys):
    assert api(stack, keys["admin"], "POST", "/patients", json={"name": "Audited Example"}).status_code == 201
    c = console()
    page = c.page
    c.sign_in(keys["admin"])
    expect(page.get_by_role("heading", name="Patients")).to_be_visible()
    page.get_by_role("link", name="Model versions").click()
    expect(page.get_by_role("heading", name="Model versions")).to_be_visible()
    expect(page.get_by_role("cell", name="1.0", exact=True)).to_be_visible()
    expect(page.get_by_role("cell", name="default", exact=True)).to_be_visible()
    c.axe("models")
    c.shot("models")
    page.get_by_role("button", name="Sign out").click()

    c.sign_in(keys["auditor"])
    expect(page.get_by_role("heading", name="Audit trail")).to_be_visible()
    expect(page.get_by_role("link", name="Patients")).to_have_count(0)
    expect(page.get_by_role("cell", name="patient.create").first).to_be_visible()
    c.axe("audit")
    c.shot("audit")


def test_a_pending_photograph_becomes_a_result_without_a_reload(browser, make_stack):
    """TorchServe unreachable from the API: the upload is stored and pending (202), the page says
    so and keeps asking; once `flask grade-pending` grades it, the result appears by itself."""
    from scripts.serving.processes import flask_cli, free_port

    offline = make_stack(api_env={"TORCHSERVE_INFERENCE_URL": f"http://127.0.0.1:{free_port()}"}, name="offline")
    key = offline.key("clinician")["Authorization"].split(" ", 1)[1]
    c = Console(browser, offline, "pending_photograph")
    try:
        pid, exam_id = new_visit(c, key, "Pending Example")
        add_photos(c, "right", "Disc-centred", [sorted(SAMPLES.glob("*.jpg"))[4]])
        expect(c.page.locator("li.upload .upload-status")).to_have_text("Stored; grading pending.")
        exam = api(offline, key, "GET", f"/patients/{pid}/exams/{exam_id}").json()
        assert exam["outcome"] == "pending"
        expect(c.page.locator(".outcome")).to_have_text(exam["message"])
        expect(c.page.locator("section[data-eye=right] .eye-status")).to_have_text("Grading in progress")
        c.axe("pending")
        c.shot("pending")

        graded = flask_cli({**offline.env, **offline.torchserve.settings_env()}, "grade-pending")
        assert graded.returncode == 0, graded.stderr
        expect(c.page.locator("section[data-eye=right] .eye-status")).not_to_have_text("Grading in progress")
        expect(c.page.locator("li.upload .upload-status")).not_to_have_text("Stored; grading pending.")
        exam = api(offline, key, "GET", f"/patients/{pid}/exams/{exam_id}").json()
        assert exam["outcome"] != "pending"
        expect(c.page.locator(".outcome")).to_have_text(exam["message"])
        c.shot("graded-later")
    finally:
        c.close()
