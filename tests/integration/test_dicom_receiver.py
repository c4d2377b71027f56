"""The DICOM receiver with real peers: dcmtk's echoscu/storescu as the camera, Orthanc as the
clinic PACS, pynetdicom as a scripted SCU for the bad files; real TorchServe and PostgreSQL.

The receiver and Orthanc start once for the module. The durability test runs receivers of its
own against a database and a TorchServe that are down."""
from __future__ import annotations

import io
import subprocess
import time
from pathlib import Path

import pydicom
import pytest
import requests
from pynetdicom import AE, _config as pynetdicom_config
from pydicom import uid as uids

from control_api.db import database_for
from control_api.models import MODELS, DicomInstance, DicomReport, Patient, Screening
from scripts.serving.processes import DicomReceiver, Orthanc, flask_cli, free_port
from tests.plugins.dicom import PHI_VALUES, bad_dicom, op_file, small_jpeg

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
ALLOWED = "CAMERA,ORTHANC"


def sample_jpeg(name: str = "idrid_01.jpg") -> bytes:
    return (REPO / "samples" / name).read_bytes()


@pytest.fixture(scope="module")
def rx_env(tmp_path_factory, scratch_database, torchserve):
    root = tmp_path_factory.mktemp("dicom")
    env = {"DATABASE_URL": scratch_database.url, "STORAGE_BACKEND": "local", "LOCAL_STORAGE_DIR": str(root / "images"),
           **torchserve.settings_env(), "TORCHSERVE_TIMEOUT_SECONDS": "60",
           "DICOM_ALLOWED_AE_TITLES": ALLOWED, "LOG_LEVEL": "DEBUG"}
    result = flask_cli(env, "migrate")
    assert result.returncode == 0, result.stderr
    return root, env


@pytest.fixture(scope="module")
def peers(rx_env, tmp_path_factory):
    """The receiver, and Orthanc as the PACS: it forwards studies to the receiver (modality
    `clarity`) and is the receiver's DICOM_REPORT_DESTINATION."""
    root, env = rx_env
    rx_port = free_port()
    orthanc = Orthanc(tmp_path_factory.mktemp("orthanc"), modalities={"clarity": ("CLARITY", "127.0.0.1", rx_port)})
    receiver = DicomReceiver(root / "receiver", {
        **env, "DICOM_REPORT_DESTINATION": f"{orthanc.ae_title}@127.0.0.1:{orthanc.dicom_port}"}, port=rx_port)
    orthanc.start(timeout=60)
    try:
        receiver.start(timeout=60)
    except BaseException:
        orthanc.stop()
        raise
    yield receiver, orthanc
    receiver.stop()
    orthanc.stop()
    assert_no_phi(receiver.log_path)


@pytest.fixture(scope="module")
def receiver(peers):
    return peers[0]


@pytest.fixture(scope="module")
def orthanc(peers):
    return peers[1]


@pytest.fixture(scope="module")
def rows(scratch_database):
    db = database_for(scratch_database.url)

    def query(fn):
        with db.bind_ctx(MODELS), db.connection_context():
            return fn()

    yield query
    db.close_all()


def assert_no_phi(*paths: Path) -> None:
    for path in paths:
        text = path.read_text(errors="replace")
        for value in PHI_VALUES + ("MRN-RX-", "MRN-ORTHANC", "MRN-DOWN"):
            assert value not in text, f"{value!r} appears in {path.name}"


def storescu(port: int, path: Path, aet: str = "CAMERA", *options: str) -> subprocess.CompletedProcess:
    return subprocess.run(["storescu", "-xy", *options, "-aet", aet, "-aec", "CLARITY", "127.0.0.1", str(port), str(path)],
                          capture_output=True, text=True, timeout=120)


def echoscu(port: int, aet: str) -> int:
    return subprocess.run(["echoscu", "-aet", aet, "-aec", "CLARITY", "127.0.0.1", str(port)],
                          capture_output=True, text=True, timeout=30).returncode


def wait_screenings(rows, patient_id: str, n: int, timeout: float = 120, done=("graded", "ungradable")):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = rows(lambda: list(Screening.select().join(Patient).where(Patient.mrn == patient_id)))
        if len(found) >= n and all(s.status in done for s in found):
            return found
        time.sleep(0.1)
    raise AssertionError(f"{n} screenings not {done} in {timeout}s: {[s.status for s in found]}")


def test_echo_from_a_listed_ae_title_is_answered_and_an_unlisted_one_is_refused(receiver):
    assert echoscu(receiver.port, "CAMERA") == 0
    assert echoscu(receiver.port, "INTRUDER") != 0
    metrics = requests.get(receiver.metrics_url, timeout=5).text
    assert 'clarity_dicom_associations_total{outcome="rejected"}' in metrics


def test_storescu_photograph_becomes_a_graded_screening_of_the_right_patient(receiver, rows, tmp_path):
    path = tmp_path / "op.dcm"
    path.write_bytes(op_file(sample_jpeg(), laterality="R", patient_id="MRN-RX-1"))  # 3410x2848, 9.7 MP
    started = time.perf_counter()
    result = storescu(receiver.port, path)
    answered = time.perf_counter() - started
    assert result.returncode == 0, result.stderr
    (screening,) = wait_screenings(rows, "MRN-RX-1", 1)
    graded = time.perf_counter() - started
    print(f"\nC-STORE of a {path.stat().st_size / 1e6:.1f} MB OP file (9.7 MP JPEG Baseline): answered in {answered:.2f} s, "
          f"graded {graded:.2f} s after the store began")
    assert screening.eye == "right" and screening.content_type == "application/dicom"
    assert screening.camera == "Topcon TRC-NW400"
    patient = rows(lambda: Patient.get(Patient.mrn == "MRN-RX-1"))
    assert patient.name == "Dicomina Testpatient" and patient.sex == "female"

    # The same SOP instance again: Success, nothing new.
    assert storescu(receiver.port, path).returncode == 0
    time.sleep(1.5)
    assert rows(lambda: Screening.select().join(Patient).where(Patient.mrn == "MRN-RX-1").count()) == 1
    metrics = requests.get(receiver.metrics_url, timeout=5).text
    assert 'clarity_dicom_ingested_total{outcome="duplicate"} 1.0' in metrics


def test_unlisted_ae_title_cannot_store(receiver, rows, tmp_path):
    path = tmp_path / "op.dcm"
    path.write_bytes(op_file(small_jpeg(7), patient_id="MRN-RX-2"))
    assert storescu(receiver.port, path, aet="INTRUDER").returncode != 0
    time.sleep(0.5)
    assert rows(lambda: Patient.select().where(Patient.mrn == "MRN-RX-2").count()) == 0


def scu_store(port: int, path: Path, sop_class) -> int | None:
    """Send a file as it is (pynetdicom does not decode a path) and return the C-STORE status;
    None when no association or presentation context was accepted."""
    pynetdicom_config.STORE_SEND_CHUNKED_DATASET = True  # send the file's bytes, never re-encode them
    ae = AE(ae_title="CAMERA")
    for syntax in (uids.JPEGBaseline8Bit, uids.ExplicitVRLittleEndian):  # one context each: both accepted
        ae.add_requested_context(sop_class, syntax)
    assoc = ae.associate("127.0.0.1", port, ae_title="CLARITY")
    if not assoc.is_established:
        return None
    try:
        status = assoc.send_c_store(path)
        return int(status.Status) if "Status" in status else None
    except ValueError:  # no accepted presentation context for this SOP class
        return None
    finally:
        assoc.release()


def test_each_bad_file_gets_its_failure_status_and_nothing_is_stored(receiver, rows, tmp_path):
    from control_api.dicom import DICOM_STATUS

    before = rows(lambda: Screening.select().count())
    for code, data in bad_dicom().items():
        path = tmp_path / f"{code}.dcm"
        path.write_bytes(data)
        sop_class = uids.CTImageStorage if code == "unsupported_sop_class" else uids.OphthalmicPhotography8BitImageStorage
        status = scu_store(receiver.port, path, sop_class)
        if code == "unsupported_sop_class":
            assert status is None  # the SOP class is not even negotiated
        else:
            assert status == DICOM_STATUS[code], (code, status)
    no_eye = tmp_path / "no_eye.dcm"
    no_eye.write_bytes(op_file(small_jpeg(8), laterality=None, patient_id="MRN-RX-3"))
    result = storescu(receiver.port, no_eye, "CAMERA", "-v")  # dcmtk reports the failure status
    assert result.returncode != 0 and "DataSetDoesNotMatchSOPClass" in result.stdout + result.stderr  # 0xA908
    time.sleep(1)
    assert rows(lambda: Screening.select().count()) == before
    assert not list((receiver.workdir / "spool").glob("*.dcm"))


def test_orthanc_forwards_a_study_and_both_eyes_are_graded_in_one_study(orthanc, receiver, rows):
    study = "1.2.826.0.1.3680043.8.498.4711"
    for laterality, name in (("L", "idrid_05.jpg"), ("R", "idrid_12.jpg")):
        data = op_file(sample_jpeg(name), laterality=laterality, patient_id="MRN-ORTHANC-1", study_uid=study)
        response = requests.post(f"{orthanc.url}/instances", data=data, timeout=30)
        assert response.status_code == 200, response.text
        study_id = response.json()["ParentStudy"]
    response = requests.post(f"{orthanc.url}/modalities/clarity/store", data=study_id, timeout=120)
    assert response.status_code == 200, response.text
    screenings = wait_screenings(rows, "MRN-ORTHANC-1", 2)
    assert sorted(s.eye for s in screenings) == ["left", "right"]
    instances = rows(lambda: list(DicomInstance.select().where(DicomInstance.screening.in_([s.id for s in screenings]))))
    assert {i.study_instance_uid for i in instances} == {study}
    assert {i.calling_ae_title for i in instances} == {"ORTHANC"}

    # The graded exam's report comes back to Orthanc as Encapsulated PDF in the same study.
    exam_id = screenings[0].exam_id
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        state = rows(lambda: DicomReport.get_or_none(DicomReport.exam == exam_id))
        if state is not None and state.status == "sent":
            break
        time.sleep(0.5)
    assert state is not None and state.status == "sent", state and state.last_error
    pdfs = []
    for instance in requests.get(f"{orthanc.url}/studies/{study_id}/instances", timeout=10).json():
        tags = requests.get(f"{orthanc.url}/instances/{instance['ID']}/simplified-tags", timeout=10).json()
        if tags.get("SOPClassUID") == uids.EncapsulatedPDFStorage:
            pdfs.append(requests.get(f"{orthanc.url}/instances/{instance['ID']}/file", timeout=10).content)
    assert len(pdfs) == 1
    ds = pydicom.dcmread(io.BytesIO(pdfs[0]))
    assert ds.StudyInstanceUID == study and ds.PatientID == "MRN-ORTHANC-1" and ds.Modality == "DOC"
    assert ds.EncapsulatedDocument.startswith(b"%PDF") and ds.MIMETypeOfEncapsulatedDocument == "application/pdf"


def test_a_store_answered_success_survives_database_and_torchserve_outages(rx_env, rows, tmp_path, torchserve):
    root, env = rx_env
    spool = tmp_path / "spool"
    down = {**env, "DICOM_SPOOL_DIR": str(spool), "DATABASE_URL": f"postgresql://postgres@127.0.0.1:{free_port()}/none",
            "TORCHSERVE_INFERENCE_URL": f"http://127.0.0.1:{free_port()}",
            "TORCHSERVE_MANAGEMENT_URL": f"http://127.0.0.1:{free_port()}"}
    path = tmp_path / "op.dcm"
    path.write_bytes(op_file(small_jpeg(9), patient_id="MRN-DOWN-1", laterality="L"))
    logs = []

    # 1. Database and TorchServe down: the store is answered Success and waits in the spool.
    with DicomReceiver(tmp_path / "rx1", down) as rx:
        logs.append(rx.log_path)
        assert storescu(rx.port, path).returncode == 0
        time.sleep(1)
        ready = requests.get(rx.readyz_url, timeout=5)
        assert ready.status_code == 503 and ready.json()["backlog"] == 1
    assert len(list(spool.glob("*.dcm"))) == 1

    # 2. A restart with the database back, TorchServe still down: ingested, pending.
    with DicomReceiver(tmp_path / "rx2", {**down, "DATABASE_URL": env["DATABASE_URL"]}) as rx:
        logs.append(rx.log_path)
        (screening,) = wait_screenings(rows, "MRN-DOWN-1", 1, done=("pending",))
        assert not list(spool.glob("*.dcm"))

    # 3. TorchServe back: the receiver grades what it left pending.
    with DicomReceiver(tmp_path / "rx3", {**env, "DICOM_SPOOL_DIR": str(spool)}) as rx:
        logs.append(rx.log_path)
        (screening,) = wait_screenings(rows, "MRN-DOWN-1", 1)
        assert requests.get(rx.readyz_url, timeout=5).status_code == 200
    assert_no_phi(*logs)


def test_op_file_uploaded_over_http_is_a_graded_exam_with_the_header_eye(rx_env, tmp_path):
    """The same kind of file through the real API (gunicorn, TorchServe, PostgreSQL): the eye,
    time and camera come from the header, and no header value reaches the API's log."""
    from scripts.serving.processes import Gunicorn

    root, env = rx_env
    token = flask_cli(env, "keys", "create", "--role", "clinician").stdout.strip()
    headers = {"Authorization": f"Bearer {token}"}
    with Gunicorn(tmp_path / "api", {**env, "UPLOAD_RATE_LIMIT": "1000/minute"}, workers=1) as api:
        patient = requests.post(f"{api.url}/api/v1/patients", headers=headers, timeout=30, json={
            "name": "Dicomina Testpatient", "medical_record_number": "MRN-RX-HTTP"}).json()
        exam = requests.post(f"{api.url}/api/v1/patients/{patient['id']}/exams", headers=headers, json={},
                             timeout=30).json()
        data = op_file(sample_jpeg("idrid_23.jpg"), laterality="L", patient_id="MRN-RX-HTTP")
        response = requests.post(f"{api.url}/api/v1/patients/{patient['id']}/exams/{exam['id']}/images",
                                 headers=headers, files={"image": ("im.dcm", data, "application/dicom")},
                                 data={"field": "macula"}, timeout=120)
        assert response.status_code == 201, response.text
        body = response.json()
        assert body["eye"] == "left" and body["status"] in ("graded", "ungradable")
        assert body["camera"] == "Topcon TRC-NW400" and body["captured_at"] == "2026-03-15T10:11:12Z"
        bad = requests.post(f"{api.url}/api/v1/patients/{patient['id']}/exams/{exam['id']}/images",
                            headers=headers, files={"image": ("im.dcm", data, "application/dicom")},
                            data={"eye": "right"}, timeout=60)
        assert bad.status_code == 422 and bad.json()["error"]["code"] == "eye_contradicts_header"
        image = requests.get(f"{api.url}{body['image']['url']}", headers=headers, timeout=30)
        assert image.content == data and image.headers["Content-Type"] == "application/dicom"
    assert_no_phi(api.log_path)
