"""DICOM Part 10 photographs through the HTTP upload route, with a fake TorchServe."""
import io
import logging

import pytest
from pydicom import uid as uids

from control_api import dicom
from control_api.errors import ApiError
from control_api.models import DicomInstance, Screening
from tests.plugins.dicom import PHI_VALUES, bad_dicom, op_file, small_jpeg

MRN = "MRN-0042"  # the `patient` fixture's record number


def send(client, headers, patient_id, data, mimetype="application/dicom", **form):
    fields = {"image": (io.BytesIO(data), "photo.dcm", mimetype), **form}
    return client.post(f"/api/v1/patients/{patient_id}/screenings", headers=headers, data=fields,
                       content_type="multipart/form-data")


@pytest.mark.parametrize("syntax", [uids.JPEGBaseline8Bit, uids.ExplicitVRLittleEndian, uids.ImplicitVRLittleEndian,
                                    uids.RLELossless, uids.JPEG2000Lossless], ids=lambda s: s.name)
def test_op_file_is_graded_with_the_header_eye_time_and_camera(app, client, clinician, patient, fake_torchserve,
                                                                syntax):
    data = op_file(small_jpeg(3), syntax=syntax, laterality="R", patient_id=MRN,
                   acquisition="20260315101112+0100")
    response = send(client, clinician, patient["id"], data)
    assert response.status_code == 201, response.json
    body = response.json
    assert body["eye"] == "right" and body["camera"] == "Topcon TRC-NW400"
    assert body["captured_at"] == "2026-03-15T09:11:12Z"
    assert body["image"]["content_type"] == "application/dicom" and body["image"]["size"] == len(data)
    sent = fake_torchserve.calls[-1]["content_type"]
    assert sent == ("image/jpeg" if syntax == uids.JPEGBaseline8Bit else "image/png")
    image = client.get(body["image"]["url"], headers=clinician)
    assert image.data == data and image.mimetype == "application/dicom"  # the original bytes
    assert image.headers["Content-Disposition"].endswith('.dcm"')


def test_dicom_is_recognised_by_its_preamble_whatever_the_declared_type(client, clinician, patient):
    response = send(client, clinician, patient["id"], op_file(small_jpeg(), patient_id=MRN), mimetype="image/jpeg")
    assert response.status_code == 201 and response.json["eye"] == "left"


def test_jpeg_baseline_frame_reaches_torchserve_unchanged():
    jpeg = small_jpeg(4)
    assert dicom.read(op_file(jpeg)).model_input() == (jpeg, "image/jpeg")


def test_laterality_falls_back_to_laterality_and_captured_at_to_content_date():
    ds_bytes = op_file(small_jpeg(), laterality=None, acquisition=None)
    import pydicom
    ds = pydicom.dcmread(io.BytesIO(ds_bytes))
    ds.Laterality = "R"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    image = dicom.read(buf.getvalue())
    assert image.eye == "right" and image.captured_at.isoformat() == "2026-03-15T10:15:00"
    assert "Testpatient" not in repr(image) and "MRN" not in repr(image.patient)


def test_form_eye_contradicting_the_header_is_422(client, clinician, patient):
    response = send(client, clinician, patient["id"], op_file(small_jpeg(), laterality="L", patient_id=MRN),
                    eye="right")
    assert response.status_code == 422 and response.json["error"]["code"] == "eye_contradicts_header"


def test_no_laterality_needs_the_form_eye(client, clinician, patient):
    data = op_file(small_jpeg(), laterality=None, patient_id=MRN)
    response = send(client, clinician, patient["id"], data)
    assert response.status_code == 422 and response.json["error"]["code"] == "laterality_missing"
    assert "ImageLaterality" in response.json["error"]["message"]
    response = send(client, clinician, patient["id"], data, eye="left")
    assert response.status_code == 201 and response.json["eye"] == "left"


def test_header_patient_id_of_another_patient_is_422(client, clinician, patient):
    response = send(client, clinician, patient["id"], op_file(small_jpeg(), patient_id="SOMEONE-ELSE"))
    assert response.status_code == 422 and response.json["error"]["code"] == "patient_mismatch"
    assert "SOMEONE-ELSE" not in response.get_data(as_text=True)


def test_same_sop_instance_twice_is_one_screening(app, client, clinician, patient):
    data = op_file(small_jpeg(), patient_id=MRN)
    first = send(client, clinician, patient["id"], data)
    second = send(client, clinician, patient["id"], data)
    assert first.status_code == 201 and second.status_code == 201
    assert second.json["id"] == first.json["id"] and second.headers["Idempotent-Replayed"] == "true"
    with app.app_context():
        assert Screening.select().count() == 1 and DicomInstance.select().count() == 1


def test_non_dicom_upload_still_needs_eye(client, clinician, patient):
    from tests.plugins.api import image_bytes
    fields = {"image": (io.BytesIO(image_bytes()), "eye.jpg")}
    response = client.post(f"/api/v1/patients/{patient['id']}/screenings", headers=clinician, data=fields,
                           content_type="multipart/form-data")
    assert response.status_code == 422 and response.json["error"]["code"] == "eye_required"


def test_torchserve_down_keeps_a_dicom_photograph_pending_and_grade_pending_grades_it(
        app, client, clinician, patient, fake_torchserve):
    fake_torchserve.mode = "down"
    response = send(client, clinician, patient["id"], op_file(small_jpeg(), syntax=uids.RLELossless, patient_id=MRN))
    assert response.status_code == 202
    fake_torchserve.mode = "grade"
    result = app.test_cli_runner().invoke(args=["grade-pending"])
    assert "1 graded" in result.output, result.output
    assert fake_torchserve.calls[-1]["content_type"] == "image/png"


BAD = bad_dicom()
BAD["undecodable_image"] = op_file(small_jpeg(5)[:-4000])  # a JPEG frame cut short inside a sound file


@pytest.mark.parametrize("code", sorted(BAD))
def test_bad_dicom_is_a_specific_4xx_and_nothing_is_stored(app, client, clinician, patient, code, caplog):
    caplog.set_level(logging.DEBUG)
    response = send(client, clinician, patient["id"], BAD[code])
    assert 400 <= response.status_code < 500 and response.json["error"]["code"] == code, response.json
    if code == "unsupported_sop_class":
        assert response.status_code == 415 and "CT Image Storage" in response.json["error"]["message"]
    with app.app_context():
        assert Screening.select().count() == 0 and DicomInstance.select().count() == 0
    assert not list(app.extensions["clarity"]["storage"].list())
    for value in PHI_VALUES:
        assert value not in caplog.text and value not in response.get_data(as_text=True)


def test_dicom_read_errors_name_their_code():
    for code, data in BAD.items():
        with pytest.raises(ApiError) as caught:
            dicom.read(data)
        assert caught.value.code == code
        assert dicom.DICOM_STATUS[code] >= 0x0100  # every refusal has a C-STORE failure status


def test_exam_route_takes_dicom_and_the_report_and_explanation_draw_it(app, client, clinician, patient):
    """A visit sent as DICOM: the eyes come from the headers, and the PDF report and the Grad-CAM
    overlay are drawn from the frame the model read, not from the DICOM file."""
    pid = patient["id"]
    exam = client.post(f"/api/v1/patients/{pid}/exams", headers=clinician, json={}).json
    study = uids.generate_uid()
    for laterality, seed in (("L", 11), ("R", 12)):
        data = op_file(small_jpeg(seed), laterality=laterality, patient_id=MRN, study_uid=study)
        fields = {"image": (io.BytesIO(data), "im.dcm", "application/dicom"), "field": "macula"}
        response = client.post(f"/api/v1/patients/{pid}/exams/{exam['id']}/images", headers=clinician,
                               data=fields, content_type="multipart/form-data")
        assert response.status_code == 201, response.json
    body = client.get(f"/api/v1/patients/{pid}/exams/{exam['id']}", headers=clinician).json
    assert sorted(i["eye"] for i in body["images"]) == ["left", "right"]
    assert body["outcome"] == "rescreen_12_months"
    explanation = client.get(f"/api/v1/patients/{pid}/screenings/{body['images'][0]['id']}/explanation",
                             headers=clinician)
    assert explanation.status_code == 200 and explanation.mimetype == "image/png"
    report = client.get(f"/api/v1/patients/{pid}/exams/{exam['id']}/report", headers=clinician)
    assert report.status_code == 200 and report.data.startswith(b"%PDF")


def test_screenings_without_exam_id_group_one_study_into_one_exam(client, clinician, patient):
    study = uids.generate_uid()
    exams = set()
    for laterality, seed in (("L", 13), ("R", 14)):
        response = send(client, clinician, patient["id"],
                        op_file(small_jpeg(seed), laterality=laterality, patient_id=MRN, study_uid=study))
        assert response.status_code == 201
        exams.add(response.json["exam_id"])
    assert len(exams) == 1


def test_encapsulated_pdf_report_is_a_readable_part10_object_of_the_study(app, client, clinician, patient):
    import pydicom

    from control_api import dicom_report
    from control_api.models import Exam

    send(client, clinician, patient["id"], op_file(small_jpeg(15), patient_id=MRN))
    with app.app_context():
        exam = Exam.get()
        data = dicom_report.encapsulated_pdf(b"%PDF-1.4 test", exam, "1.2.3.4", "CLARITY")
        assert dicom_report.state(exam) is None
    ds = pydicom.dcmread(io.BytesIO(data))
    assert ds.SOPClassUID == uids.EncapsulatedPDFStorage and ds.StudyInstanceUID == "1.2.3.4"
    assert ds.EncapsulatedDocument.startswith(b"%PDF") and ds.PatientID == MRN
    assert ds.PatientName.family_name == "Testpatient"  # "Ada Testpatient" -> Testpatient^Ada
    assert dicom_report.parse_destination("PACS@10.0.0.5:104") == ("PACS", "10.0.0.5", 104)
    with pytest.raises(ValueError):
        dicom_report.parse_destination("10.0.0.5:104")
    exam_json = client.get(f"/api/v1/patients/{patient['id']}/exams/{exam.id}", headers=clinician).json
    assert exam_json["dicom_report"] is None
