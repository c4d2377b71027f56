"""Every clinical word and code the API writes, in one table.

Grades, outcomes, the visit's next step, LOINC codes and answers and the FHIR systems live
here and nowhere else: the JSON answers, the PDF report and the FHIR export all read them from
this module, so a wording or code fix is one edit. Sources are named beside each table.
"""
from __future__ import annotations

# International Clinical Diabetic Retinopathy severity scale (ICDR; Wilkinson et al.,
# Ophthalmology 2003), grade 0-4, in the words of LOINC answer list LL2117-1.
ICDR_GRADES = {
    0: "No apparent retinopathy",
    1: "Mild non-proliferative retinopathy",
    2: "Moderate non-proliferative retinopathy",
    3: "Severe non-proliferative retinopathy",
    4: "Proliferative retinopathy",
}

# Visit outcomes, worded as the cleared autonomous DR products word them (IDx-DR /
# LumineticsCore and EyeArt instructions for use): "more than mild diabetic retinopathy
# detected: refer to an eye care professional", "negative for more than mild diabetic
# retinopathy: rescreen in 12 months", and "insufficient image quality". `pending` is ours:
# those products answer only when every photograph is analysed.
OUTCOMES = ("refer", "rescreen_12_months", "retake", "pending")
OUTCOME_MESSAGES = {
    "refer": "More than mild diabetic retinopathy detected: refer to an eye care professional.",
    "rescreen_12_months": "Negative for more than mild diabetic retinopathy: rescreen in 12 months.",
    "retake": "Insufficient image quality: retake the photographs of the eye(s) without a gradable image.",
    "pending": "Grading is still in progress: check again later.",
}
OUTCOME_SOURCE = ("outcome wording of the cleared autonomous DR screening products IDx-DR / "
                  "LumineticsCore (Digital Diagnostics) and EyeArt (Eyenuk)")

EYE_WORDS = {"left": "Left eye", "right": "Right eye"}
FIELD_WORDS = {"disc": "disc-centred", "macula": "macula-centred", "other": "other field"}

# --- FHIR R4 --------------------------------------------------------------------------------
LOINC = "http://loinc.org"
DATA_ABSENT_REASON = "http://terminology.hl7.org/CodeSystem/data-absent-reason"
OBSERVATION_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
IDENTIFIER_TYPE = "http://terminology.hl7.org/CodeSystem/v2-0203"
DEVICE_NAME_TYPE = "model-name"  # Device.deviceName.type (R4 DeviceNameType)
# Our own systems: ids we issue, and the clinic's identifiers as it gave them.
PATIENT_ID_SYSTEM = "urn:clarity-in-care:patient-id"
EXAM_ID_SYSTEM = "urn:clarity-in-care:exam-id"
MRN_SYSTEM = "urn:clarity-in-care:medical-record-number"
ACCESSION_SYSTEM = "urn:clarity-in-care:accession-number"
MODEL_SYSTEM = "urn:clarity-in-care:model"

# LOINC "Diabetic retinopathy severity level by Ophthalmoscopy", one code per eye.
EYE_SEVERITY_CODE = {
    "left": ("71490-7", "Diabetic retinopathy severity level by Ophthalmoscopy - left eye"),
    "right": ("71491-5", "Diabetic retinopathy severity level by Ophthalmoscopy - right eye"),
}
SEVERITY_ANSWER_LIST = "LL2117-1"
SEVERITY_ANSWERS = {  # ICDR grade -> LOINC answer (LL2117-1); it has no "ungradable" answer
    0: "LA18643-9",
    1: "LA18644-7",
    2: "LA18645-4",
    3: "LA18646-2",
    4: "LA18648-8",
}

# LOINC 105914-6 "Eye Diabetic retinopathy screening Autonomous artificial intelligence" and
# its answers. Meant for cleared software: a synthetic-data model says so beside it.
SCREENING_CODE = ("105914-6", "Eye Diabetic retinopathy screening Autonomous artificial intelligence")
SCREENING_ANSWERS = {
    "rescreen_12_months": ("LA34398-0", "ETDRS level 20 or lower, without macular edema"),
    "refer": ("LA35099-3", "ETDRS level 35 or higher and/or macular edema"),
    "retake": ("LA34400-4", "Insufficient image quality to support autonomous analysis"),
}

# An ungradable eye's Observation carries dataAbsentReason, never a guessed grade.
UNGRADABLE_ABSENT = ("error", "Error")          # there was a photograph; its quality failed
MISSING_ABSENT = ("not-performed", "Not Performed")  # no photograph of this eye
PENDING_ABSENT = ("temp-unknown", "Temporarily Unknown")

# DiagnosticReport / Observation status from the exam's state.
REPORT_STATUS = {"pending": "partial", "refer": "final", "rescreen_12_months": "final", "retake": "final"}
OBSERVATION_STATUS = {"pending": "preliminary", "graded": "final", "ungradable": "final", "missing": "final"}

SYNTHETIC_NOTE = ("The grading model was trained on synthetic images only. It is not cleared "
                  "software and its results are not for clinical use; LOINC 105914-6 is meant "
                  "for cleared autonomous AI.")
