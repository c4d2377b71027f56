"""A visit through the real stack (gunicorn, TorchServe with the test model, PostgreSQL,
SeaweedFS S3): two photographs of each eye, the left eye ungradable; per-eye results, the
outcome, the FHIR Bundle (validated), the PDF read back with poppler, the Grad-CAM overlay,
bad input, and the time a report and a Bundle take.

The accession number carries a PHI marker: make_stack fails the module if any log shows it.
"""
from __future__ import annotations

import io
import json
import os
import statistics
import subprocess
import time
from pathlib import Path

import pytest
import requests
from PIL import Image

from control_api import codes, fhir
from tests.support.images import blurred, darkened, encode, fundus_like
from tests.support.harness import PHI_MRN, PHI_NAME, new_patient

pytestmark = pytest.mark.integration

SAMPLES = Path(__file__).resolve().parents[2] / "samples"
# Where the rendered first page and the timings are left for a person to look at (optional).
ARTIFACTS = os.environ.get("CLARITY_EXAM_ARTIFACTS")


@pytest.fixture(scope="module")
def stack(make_stack):
    return make_stack(name="exams")


@pytest.fixture(scope="module")
def clinician(stack):
    return stack.key("clinician")


def post_exam(stack, headers, pid, **body):
    return requests.post(f"{stack.url}/api/v1/patients/{pid}/exams", headers=headers, json=body, timeout=30)


def post_image(stack, headers, pid, exam_id, data: bytes, eye: str, field: str, **extra):
    return requests.post(f"{stack.url}/api/v1/patients/{pid}/exams/{exam_id}/images", headers=headers,
                         files={"image": ("photo.jpg", io.BytesIO(data), "image/jpeg")},
                         data={"eye": eye, "field": field, **extra}, timeout=120)


def get(stack, headers, path, **params):
    return requests.get(f"{stack.url}/api/v1{path}", headers=headers, params=params, timeout=120)


@pytest.fixture(scope="module")
def visit(stack, clinician):
    pid = new_patient(stack, clinician, "exam")
    exam = post_exam(stack, clinician, pid, performed_at="2024-06-01T09:00:00Z",
                     accession_number=f"{PHI_MRN}ACC-1")
    assert exam.status_code == 201, exam.text
    eid = exam.json()["id"]
    right = [(SAMPLES / "right_normal_600.jpg").read_bytes(), (SAMPLES / "idrid_05.jpg").read_bytes()]
    left = [encode(darkened(fundus_like(seed=3))), encode(blurred(fundus_like(seed=4), 0.03))]
    photos = {}
    for eye, images in (("right", right), ("left", left)):
        for data, field in zip(images, ("disc", "macula")):
            response = post_image(stack, clinician, pid, eid, data, eye, field)
            assert response.status_code == 201, response.text
            photos[(eye, field)] = response.json()
    return {"pid": pid, "eid": eid, "photos": photos}


def test_per_eye_results_and_outcome(stack, clinician, visit):
    exam = get(stack, clinician, f"/patients/{visit['pid']}/exams/{visit['eid']}").json()
    photos = visit["photos"]
    right_grades = {f: photos[("right", f)]["result"]["grade"] for f in ("disc", "macula")}
    assert all(photos[("right", f)]["status"] == "graded" for f in ("disc", "macula"))
    assert all(photos[("left", f)]["status"] == "ungradable" for f in ("disc", "macula"))
    right = exam["eyes"]["right"]
    top = max(right_grades.values())
    decider = next(photos[("right", f)]["id"] for f in ("disc", "macula") if right_grades[f] == top)
    assert (right["status"], right["gradable"], right["grade"], right["deciding_image_id"]) == \
        ("graded", True, top, decider)
    assert right["label"] == codes.ICDR_GRADES[top]
    assert right["referable"] is (top >= 2)  # the test model's threshold
    left = exam["eyes"]["left"]
    assert (left["status"], left["gradable"], left["grade"]) == ("ungradable", False, None)
    assert {r["code"] for r in left["quality_reasons"]} >= {"too_dark"}
    assert exam["outcome"] == ("refer" if right["referable"] else "retake")
    assert exam["message"] == codes.OUTCOME_MESSAGES[exam["outcome"]]
    assert exam["model"]["synthetic_training_data"] is True
    assert [(i["eye"], i["field"]) for i in exam["images"]] == \
        [("right", "disc"), ("right", "macula"), ("left", "disc"), ("left", "macula")]
    summary = get(stack, clinician, f"/patients/{visit['pid']}/summary").json()
    assert summary["exam_id"] == visit["eid"] and summary["outcome"] == exam["outcome"]


def test_fhir_bundle(stack, clinician, visit):
    response = get(stack, clinician, f"/patients/{visit['pid']}/exams/{visit['eid']}/fhir", include_pdf="true")
    assert response.status_code == 200 and response.headers["Content-Type"].startswith("application/fhir+json")
    bundle = response.json()
    fhir.validate(bundle)  # fhir.resources R4B models
    resources = [e["resource"] for e in bundle["entry"]]
    kinds = sorted(r["resourceType"] for r in resources)
    assert kinds == ["Device", "DiagnosticReport", "Observation", "Observation", "Observation", "Patient"]
    by_code = {r["code"]["coding"][0]["code"]: r for r in resources if r["resourceType"] == "Observation"}
    exam = get(stack, clinician, f"/patients/{visit['pid']}/exams/{visit['eid']}").json()
    right = by_code["71491-5"]["valueCodeableConcept"]["coding"][0]
    assert right["system"] == "http://loinc.org"
    assert right["code"] == codes.SEVERITY_ANSWERS[exam["eyes"]["right"]["grade"]]
    left = by_code["71490-7"]
    assert "valueCodeableConcept" not in left and left["dataAbsentReason"]["coding"][0]["code"] == "error"
    answer = by_code["105914-6"]["valueCodeableConcept"]["coding"][0]["code"]
    assert answer == {"refer": "LA35099-3", "retake": "LA34400-4"}[exam["outcome"]]
    assert any("synthetic" in n["text"] for n in by_code["105914-6"]["note"])
    report = next(r for r in resources if r["resourceType"] == "DiagnosticReport")
    assert report["status"] == "final" and report["conclusionCode"][0]["coding"][0]["code"] == answer
    assert report["presentedForm"][0]["contentType"] == "application/pdf"
    device = next(r for r in resources if r["resourceType"] == "Device")
    assert device["version"][0]["value"] == exam["model"]["version"] and "synthetic" in device["note"][0]["text"]
    patient = next(r for r in resources if r["resourceType"] == "Patient")
    assert patient["name"][0]["text"].startswith(PHI_NAME)


def test_pdf_report(stack, clinician, visit, tmp_path):
    response = get(stack, clinician, f"/patients/{visit['pid']}/exams/{visit['eid']}/report")
    assert response.status_code == 200 and response.headers["Content-Type"] == "application/pdf"
    pdf = tmp_path / "report.pdf"
    pdf.write_bytes(response.content)
    text = " ".join(subprocess.run(["pdftotext", str(pdf), "-"], capture_output=True, text=True,
                                   check=True).stdout.split())
    exam = get(stack, clinician, f"/patients/{visit['pid']}/exams/{visit['eid']}").json()
    for words in (PHI_NAME, f"{PHI_MRN}ACC-1", "2024-06-01 09:00 UTC", "NOT FOR CLINICAL USE",
                  exam["eyes"]["right"]["label"], "Ungradable", "too dark", exam["message"],
                  f"dr version {exam['model']['version']}", "Grad-CAM overlay of the photograph"):
        assert words in text, words
    assert "overlay unavailable" not in text
    listing = subprocess.run(["pdfimages", "-list", str(pdf)], capture_output=True, text=True, check=True).stdout
    assert len(listing.splitlines()) - 2 == 5  # four thumbnails, one overlay (the left eye has none)
    subprocess.run(["pdftoppm", "-png", "-r", "60", str(pdf), str(tmp_path / "page")], check=True)
    pages = sorted(tmp_path.glob("page*.png"))
    assert pages and Image.open(pages[0]).size[0] > 400
    if ARTIFACTS:
        Path(ARTIFACTS).mkdir(parents=True, exist_ok=True)
        pdf_copy = Path(ARTIFACTS) / "exam-report.pdf"
        pdf_copy.write_bytes(response.content)
        subprocess.run(["pdftoppm", "-png", "-r", "70", str(pdf_copy), str(Path(ARTIFACTS) / "exam-report")],
                       check=True)


def test_explanation_at_the_photographs_aspect(stack, clinician, visit):
    photo = visit["photos"][("right", "macula")]  # idrid_05: about 3400 x 2848
    response = get(stack, clinician, f"/patients/{visit['pid']}/screenings/{photo['id']}/explanation")
    assert response.status_code == 200 and response.headers["Content-Type"] == "image/png"
    png = Image.open(io.BytesIO(response.content))
    source = Image.open(SAMPLES / "idrid_05.jpg").size
    assert png.size[0] == 1024 and abs(png.size[0] / (png.size[1] - 56) - source[0] / source[1]) < 0.01
    if ARTIFACTS:
        Path(ARTIFACTS).mkdir(parents=True, exist_ok=True)
        (Path(ARTIFACTS) / "explanation.png").write_bytes(response.content)
    ungradable = visit["photos"][("left", "disc")]
    response = get(stack, clinician, f"/patients/{visit['pid']}/screenings/{ungradable['id']}/explanation")
    assert response.status_code == 422 and response.json()["error"]["code"] == "ungradable_photograph"


def counts(stack) -> tuple:
    return tuple(stack.sql(f"SELECT count(*) FROM {t}")[0][0] for t in ("exam", "screening", "grading"))


def test_bad_input_is_refused_and_leaves_nothing(stack, clinician, visit):
    pid, eid = visit["pid"], visit["eid"]
    other = new_patient(stack, clinician, "exam-other")
    theirs = post_exam(stack, clinician, other).json()["id"]
    photo = (SAMPLES / "right_normal_600.jpg").read_bytes()
    before = counts(stack)
    unknown = post_image(stack, clinician, pid, "00000000-0000-4000-8000-000000000000", photo, "right", "disc")
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "exam_not_found"
    wrong_patient = post_image(stack, clinician, pid, theirs, photo, "right", "disc")
    assert wrong_patient.status_code == 404 and wrong_patient.json()["error"]["code"] == "exam_not_found"
    other_url = get(stack, clinician, f"/patients/{other}/exams/{eid}/report")
    assert other_url.status_code == 404 and other_url.json()["error"]["code"] == "exam_not_found"
    field = post_image(stack, clinician, pid, eid, photo, "right", "fovea")
    assert field.status_code == 422 and "field" in field.json()["error"]["details"]["multipart"]
    via_form = requests.post(f"{stack.url}/api/v1/patients/{pid}/screenings", headers=clinician,
                             files={"image": ("p.jpg", io.BytesIO(photo), "image/jpeg")},
                             data={"eye": "right", "exam_id": theirs}, timeout=60)
    assert via_form.status_code == 422 and via_form.json()["error"]["code"] == "exam_of_another_patient"
    assert counts(stack) == before


def test_time_to_report_and_bundle(stack, clinician, visit):
    """Measured, not asserted (timed assertions do not belong in tests); printed and, with
    CLARITY_EXAM_ARTIFACTS set, written to timings.json."""
    base = f"/patients/{visit['pid']}/exams/{visit['eid']}"
    timings = {}
    for name, path, params in (("report", f"{base}/report", {}), ("fhir", f"{base}/fhir", {}),
                               ("fhir_with_pdf", f"{base}/fhir", {"include_pdf": "true"}),
                               ("exam_json", base, {})):
        runs = []
        for _ in range(5):
            started = time.perf_counter()
            assert get(stack, clinician, path, **params).status_code == 200
            runs.append((time.perf_counter() - started) * 1000)
        timings[name] = {"median_ms": round(statistics.median(runs), 1), "min_ms": round(min(runs), 1),
                         "max_ms": round(max(runs), 1), "runs": len(runs)}
    print("\nexam export timings (4-photograph exam):", json.dumps(timings))
    if ARTIFACTS:
        Path(ARTIFACTS).mkdir(parents=True, exist_ok=True)
        (Path(ARTIFACTS) / "timings.json").write_text(json.dumps(timings, indent=2))
