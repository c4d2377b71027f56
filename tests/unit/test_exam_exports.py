"""The PDF report, the FHIR Bundle and the Grad-CAM overlay of an exam, with the fake TorchServe."""
import base64
import io
import os
import shutil
import subprocess

import pytest
from PIL import Image

from control_api import codes, fhir
from control_api.models import AuditEvent
from tests.unit.test_exams_api import add, new_exam

API = "/api/v1/patients"


@pytest.fixture
def visit(client, clinician, patient, fake_torchserve):
    """Right eye: grades 1 and 2 (referable); left eye: two ungradable photographs."""
    pid = patient["id"]
    exam = new_exam(client, clinician, pid, performed_at="2024-06-01T09:00:00Z", accession_number="ACC-5")
    fake_torchserve.grade = 1
    add(client, clinician, pid, exam["id"], eye="right", field="disc")
    fake_torchserve.grade = 2
    decider = add(client, clinician, pid, exam["id"], eye="right", field="macula", color=(2, 2, 2)).json
    fake_torchserve.mode = "ungradable"
    for n, field in enumerate(("disc", "macula")):
        add(client, clinician, pid, exam["id"], eye="left", field=field, color=(n, 7, 7))
    fake_torchserve.mode = "grade"
    return {"pid": pid, "exam": exam["id"], "decider": decider["id"]}


def entries(bundle, kind):
    return [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == kind]


def test_fhir_bundle(client, clinician, visit, patient):
    response = client.get(f"{API}/{visit['pid']}/exams/{visit['exam']}/fhir", headers=clinician)
    assert response.status_code == 200 and response.mimetype == "application/fhir+json"
    bundle = response.json
    fhir.validate(bundle)
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "collection"
    [report] = entries(bundle, "DiagnosticReport")
    assert report["status"] == "final" and "presentedForm" not in report
    assert report["conclusionCode"][0]["coding"][0]["code"] == "LA35099-3"
    assert report["conclusion"].startswith(codes.OUTCOME_MESSAGES["refer"])
    observations = {o["code"]["coding"][0]["code"]: o for o in entries(bundle, "Observation")}
    assert set(observations) == {"71490-7", "71491-5", "105914-6"}
    right, left = observations["71491-5"], observations["71490-7"]
    assert right["valueCodeableConcept"]["coding"][0] == {
        "system": "http://loinc.org", "code": "LA18645-4", "display": "Moderate non-proliferative retinopathy"}
    assert "valueCodeableConcept" not in left and left["dataAbsentReason"]["coding"][0]["code"] == "error"
    assert "too dark" in left["note"][0]["text"]
    screening = observations["105914-6"]
    assert screening["valueCodeableConcept"]["coding"][0]["code"] == "LA35099-3"
    assert any("synthetic" in n["text"] for n in screening["note"])
    [device] = entries(bundle, "Device")
    assert device["version"][0]["value"] == "1.0" and "synthetic" in device["note"][0]["text"]
    assert device["property"][0]["valueCode"][0]["text"] == "true"
    [person] = entries(bundle, "Patient")
    assert person["name"][0]["text"] == patient["name"] and person["birthDate"] == patient["birth_date"]
    assert {"system": codes.MRN_SYSTEM, "value": "MRN-0042"}.items() <= person["identifier"][1].items()
    assert report["identifier"][1]["value"] == "ACC-5"
    # Every reference resolves inside the bundle.
    urls = {e["fullUrl"] for e in bundle["entry"]}
    refs = [r["reference"] for o in entries(bundle, "Observation") for r in (o["subject"], o["device"])]
    assert set(refs) <= urls and {r["reference"] for r in report["result"]} <= urls


def test_fhir_with_pdf(client, clinician, visit):
    response = client.get(f"{API}/{visit['pid']}/exams/{visit['exam']}/fhir?include_pdf=true", headers=clinician)
    [report] = entries(response.json, "DiagnosticReport")
    pdf = base64.b64decode(report["presentedForm"][0]["data"])
    assert pdf.startswith(b"%PDF-") and report["presentedForm"][0]["contentType"] == "application/pdf"


def test_pending_and_empty_exams_export(client, clinician, patient, fake_torchserve):
    pid = patient["id"]
    exam = new_exam(client, clinician, pid)
    empty = client.get(f"{API}/{pid}/exams/{exam['id']}/fhir", headers=clinician).json
    fhir.validate(empty)
    assert not entries(empty, "Device")
    assert all(o["dataAbsentReason"]["coding"][0]["code"] == "not-performed"
               for o in entries(empty, "Observation") if o["code"]["coding"][0]["code"] != "105914-6")
    fake_torchserve.mode = "down"
    add(client, clinician, pid, exam["id"])
    pending = client.get(f"{API}/{pid}/exams/{exam['id']}/fhir", headers=clinician).json
    fhir.validate(pending)
    [report] = entries(pending, "DiagnosticReport")
    assert report["status"] == "partial" and "conclusionCode" not in report
    # The report renders without a model server (no overlay to draw yet).
    assert client.get(f"{API}/{pid}/exams/{exam['id']}/report", headers=clinician).status_code == 200


@pytest.mark.skipif(not shutil.which("pdftotext") and not os.environ.get("CLARITY_REQUIRE_SERVICES"),
                    reason="poppler-utils missing (.ci/run installs it and never skips)")
def test_pdf_report(client, clinician, visit, patient, tmp_path):
    response = client.get(f"{API}/{visit['pid']}/exams/{visit['exam']}/report", headers=clinician)
    assert response.status_code == 200 and response.mimetype == "application/pdf"
    path = tmp_path / "report.pdf"
    path.write_bytes(response.data)
    text = " ".join(subprocess.run(["pdftotext", str(path), "-"], capture_output=True, text=True,
                                   check=True).stdout.split())
    for words in (patient["name"], "1961-03-04", "MRN-0042", "ACC-5", "2024-06-01 09:00 UTC",
                  "NOT FOR CLINICAL USE", "Moderate non-proliferative retinopathy", "Ungradable",
                  "The image is too dark", "refer to an eye care professional", "Grad-CAM overlay",
                  "dr version 1.0", "Right eye", "Left eye"):
        assert words in text, words
    images = subprocess.run(["pdfimages", "-list", str(path)], capture_output=True, text=True, check=True).stdout
    assert len(images.splitlines()) - 2 >= 5  # four thumbnails and the overlay


def test_explanation(client, clinician, visit):
    response = client.get(f"{API}/{visit['pid']}/screenings/{visit['decider']}/explanation", headers=clinician)
    assert response.status_code == 200 and response.mimetype == "image/png"
    png = Image.open(io.BytesIO(response.data))
    assert png.size == (256, 256 + 56)  # the 256 px test photograph at its aspect, the scale under it
    peak, cold, outside = png.getpixel((175, 45)), png.getpixel((90, 200)), png.getpixel((2, 2))
    assert peak[0] > peak[2] and cold[2] > cold[0]  # red where the map peaks, blue where it is low
    assert outside == (2, 2, 2)  # outside the retina the photograph is untouched
    events = [e.action for e in AuditEvent.select().where(AuditEvent.resource_id == visit["decider"])]
    assert "screening.explanation.read" in events


def test_explanation_refusals(client, clinician, visit, fake_torchserve, patient):
    pid = visit["pid"]
    exam = client.get(f"{API}/{pid}/exams/{visit['exam']}", headers=clinician).json
    ungradable = next(i["id"] for i in exam["images"] if i["eye"] == "left")
    response = client.get(f"{API}/{pid}/screenings/{ungradable}/explanation", headers=clinician)
    assert response.status_code == 422 and response.json["error"]["code"] == "ungradable_photograph"
    fake_torchserve.mode = "down"
    response = client.get(f"{API}/{pid}/screenings/{visit['decider']}/explanation", headers=clinician)
    assert response.status_code == 503 and response.json["error"]["code"] == "model_server_unavailable"
    pending = add(client, clinician, pid, visit["exam"], color=(40, 40, 40)).json["id"]
    response = client.get(f"{API}/{pid}/screenings/{pending}/explanation", headers=clinician)
    assert response.status_code == 409 and response.json["error"]["code"] == "not_graded_yet"


def test_exports_of_another_patients_exam_are_404(client, clinician, visit):
    other = client.post(API, headers=clinician, json={"name": "Other Person"}).json["id"]
    for suffix in ("report", "fhir"):
        response = client.get(f"{API}/{other}/exams/{visit['exam']}/{suffix}", headers=clinician)
        assert response.status_code == 404 and response.json["error"]["code"] == "exam_not_found"


def test_exports_are_audited_reads(client, clinician, visit):
    for suffix in ("report", "fhir"):
        client.get(f"{API}/{visit['pid']}/exams/{visit['exam']}/{suffix}", headers=clinician)
    rows = [(e.action, str(e.resource_id), str(e.patient_id)) for e in
            AuditEvent.select().where(AuditEvent.action.in_(["exam.report.read", "exam.fhir.read"]))]
    assert rows == [("exam.report.read", visit["exam"], visit["pid"]), ("exam.fhir.read", visit["exam"], visit["pid"])]
