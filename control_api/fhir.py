"""FHIR R4 export of an exam: a Bundle (type collection) holding

- the Patient, with the identifiers the clinic gave (record number) and ours;
- a Device for the grading model (name, version, whether it was trained on synthetic data);
- one Observation per eye, LOINC 71490-7 (left) / 71491-5 (right), valued from answer list
  LL2117-1; an eye without a gradable photograph carries dataAbsentReason and its quality
  reasons as a note, never a guessed grade;
- one Observation for the exam, LOINC 105914-6 with its answers (refer, rescreen, retake);
- a DiagnosticReport for the exam: status from the exam's state, conclusion and
  conclusionCode for the outcome, the observations as results, the PDF when asked.

Codes come from codes.py. Every Bundle is validated before it leaves with fhir.resources'
R4B models: the package ships R5 (its default) and R4B but no plain R4, and R4B is R4's
technical correction with the same shapes for every resource used here.
"""
from __future__ import annotations

import base64
import uuid
from datetime import datetime, timezone

from . import codes
from .models import Patient
from .outcome import ExamResult

CONTENT_TYPE = "application/fhir+json"
_NS = uuid.UUID("6f1c2a7e-93b4-4a5e-9d0c-3c1e7f0a2b11")  # stable ids: a re-export gives the same ones


def _id(*parts) -> str:
    return str(uuid.uuid5(_NS, "/".join(map(str, parts))))


def _instant(value: datetime) -> str:
    return value.replace(tzinfo=timezone.utc, microsecond=0).isoformat()


def _loinc(code: str, display: str) -> dict:
    return {"system": codes.LOINC, "code": code, "display": display}


def _absent(reason: tuple[str, str]) -> dict:
    return {"coding": [{"system": codes.DATA_ABSENT_REASON, "code": reason[0], "display": reason[1]}]}


def _patient(patient: Patient) -> dict:
    identifiers = [{"system": codes.PATIENT_ID_SYSTEM, "value": str(patient.id)}]
    if patient.mrn:
        identifiers.append({"use": "usual", "system": codes.MRN_SYSTEM, "value": patient.mrn, "type": {
            "coding": [{"system": codes.IDENTIFIER_TYPE, "code": "MR", "display": "Medical record number"}]}})
    resource = {"resourceType": "Patient", "id": str(patient.id), "identifier": identifiers,
                "name": [{"text": patient.name}]}
    if patient.birth_date:
        resource["birthDate"] = patient.birth_date.isoformat()
    if patient.sex:
        resource["gender"] = patient.sex  # female | male | other | unknown, as FHIR's AdministrativeGender
    return resource


def _device(model: dict) -> dict:
    synthetic = bool(model.get("synthetic_training_data"))
    device = {
        "resourceType": "Device", "id": _id("device", model["name"], model["version"]), "status": "active",
        "identifier": [{"system": codes.MODEL_SYSTEM, "value": f"{model['name']}:{model['version']}"}],
        "deviceName": [{"name": model["name"], "type": codes.DEVICE_NAME_TYPE}],
        "type": {"text": "Diabetic retinopathy grading software (artificial intelligence)"},
        "version": [{"value": str(model["version"])}],
        "property": [{"type": {"text": "synthetic_training_data"},
                      "valueCode": [{"text": "true" if synthetic else "false"}]}],
    }
    if synthetic:
        device["note"] = [{"text": codes.SYNTHETIC_NOTE}]
    return device


def _eye_observation(eye: str, result, base: dict) -> dict:
    code, display = codes.EYE_SEVERITY_CODE[eye]
    observation = {**base, "resourceType": "Observation", "id": _id(base["_exam"], "eye", eye),
                   "status": codes.OBSERVATION_STATUS[result.status],
                   "code": {"coding": [_loinc(code, display)], "text": f"{display} ({codes.EYE_WORDS[eye]})"}}
    if result.gradable:
        observation["valueCodeableConcept"] = {
            "coding": [_loinc(codes.SEVERITY_ANSWERS[result.grade], codes.ICDR_GRADES[result.grade])],
            "text": codes.ICDR_GRADES[result.grade]}
        observation["note"] = [{"text": "Referable (the grade reaches the model's referral threshold)."
                                if result.referable else "Not referable."}]
        if result.deciding_image_id:
            observation["note"].append({"text": f"Decided by photograph {result.deciding_image_id}."})
    else:
        reason = {"missing": codes.MISSING_ABSENT, "pending": codes.PENDING_ABSENT}.get(
            result.status, codes.UNGRADABLE_ABSENT)
        observation["dataAbsentReason"] = _absent(reason)
        text = {"missing": "No photograph of this eye.", "pending": "Grading pending."}.get(
            result.status, "Ungradable: insufficient image quality.")
        reasons = "; ".join(r.get("message") or r["code"] for r in result.quality_reasons)
        observation["note"] = [{"text": f"{text} {reasons}".strip()}]
    observation.pop("_exam")
    return observation


def bundle(patient: Patient, result: ExamResult, pdf: bytes | None = None) -> dict:
    exam = result.exam
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    patient_res = _patient(patient)
    patient_url = f"urn:uuid:{patient.id}"
    device = _device(result.model) if result.model else None
    device_url = f"urn:uuid:{device['id']}" if device else None
    synthetic = bool(result.model and result.model.get("synthetic_training_data"))

    base = {"_exam": exam.id, "category": [{"coding": [{"system": codes.OBSERVATION_CATEGORY, "code": "exam",
                                                         "display": "Exam"}]}],
            "subject": {"reference": patient_url}, "effectiveDateTime": _instant(exam.performed_at)}
    if device_url:
        base["device"] = {"reference": device_url}
    eyes = [_eye_observation(eye, result.eyes[eye], base) for eye in ("left", "right")]

    screening = {**base, "resourceType": "Observation", "id": _id(exam.id, "screening"),
                 "status": "preliminary" if result.outcome == "pending" else "final",
                 "code": {"coding": [_loinc(*codes.SCREENING_CODE)]},
                 "hasMember": [{"reference": f"urn:uuid:{o['id']}"} for o in eyes]}
    screening.pop("_exam")
    answer = codes.SCREENING_ANSWERS.get(result.outcome)
    if answer:
        screening["valueCodeableConcept"] = {"coding": [_loinc(*answer)], "text": result.message}
    else:
        screening["dataAbsentReason"] = _absent(codes.PENDING_ABSENT)
    notes = [{"text": f"{result.message} ({codes.OUTCOME_SOURCE})"}]
    if synthetic:
        notes.append({"text": codes.SYNTHETIC_NOTE})
    screening["note"] = notes

    identifiers = [{"system": codes.EXAM_ID_SYSTEM, "value": str(exam.id)}]
    if exam.accession_number:
        identifiers.append({"system": codes.ACCESSION_SYSTEM, "value": exam.accession_number, "type": {
            "coding": [{"system": codes.IDENTIFIER_TYPE, "code": "ACSN", "display": "Accession ID"}]}})
    report = {
        "resourceType": "DiagnosticReport", "id": _id(exam.id, "report"), "identifier": identifiers,
        "status": codes.REPORT_STATUS[result.outcome],
        "category": [{"text": "Eye screening"}],
        "code": {"coding": [_loinc(*codes.SCREENING_CODE)], "text": "Diabetic retinopathy screening"},
        "subject": {"reference": patient_url}, "effectiveDateTime": _instant(exam.performed_at),
        "issued": _instant(now),
        "result": [{"reference": f"urn:uuid:{o['id']}"} for o in (*eyes, screening)],
        "conclusion": result.message + (f" {codes.SYNTHETIC_NOTE}" if synthetic else ""),
    }
    if answer:
        report["conclusionCode"] = [{"coding": [_loinc(*answer)], "text": result.message}]
    if pdf is not None:
        report["presentedForm"] = [{"contentType": "application/pdf", "language": "en",
                                    "data": base64.b64encode(pdf).decode("ascii"),
                                    "title": "Diabetic retinopathy screening report", "creation": _instant(now)}]

    resources = [report, patient_res, *([device] if device else []), *eyes, screening]
    data = {"resourceType": "Bundle", "id": str(uuid.uuid4()), "type": "collection", "timestamp": _instant(now),
            "identifier": {"system": codes.EXAM_ID_SYSTEM, "value": str(exam.id)},
            "entry": [{"fullUrl": f"urn:uuid:{r['id']}", "resource": r} for r in resources]}
    validate(data)
    return data


def validate(data: dict) -> None:
    """Raise if `data` is not a valid Bundle by fhir.resources' R4B models (pydantic)."""
    from fhir.resources.R4B.bundle import Bundle  # heavy import (about 1 s): only when exporting

    Bundle.model_validate(data)
