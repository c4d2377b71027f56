"""The audit trail: a row for every access to patient data, readable by auditors; no PHI in logs."""
import json
import logging

from control_api.logs import formatter
from control_api.models import AuditEvent
from tests.plugins.api import image_bytes, upload


def events(app, **where):
    with app.app_context():
        query = AuditEvent.select().order_by(AuditEvent.id)
        for field, value in where.items():
            query = query.where(getattr(AuditEvent, field) == value)
        return [(e.action, e.outcome, str(e.resource_id) if e.resource_id else None) for e in query]


def test_every_patient_data_access_is_audited(app, client, clinician, patient, make_key):
    pid = patient["id"]
    sid = upload(client, clinician, pid, image_bytes()).json["id"]
    base = f"/api/v1/patients/{pid}"
    calls = [
        ("GET", base, None), ("PATCH", base, {"sex": "unknown"}), ("GET", f"{base}/summary", None),
        ("GET", f"{base}/screenings", None), ("GET", f"{base}/screenings/{sid}", None),
        ("GET", f"{base}/screenings/{sid}/image", None), ("POST", f"{base}/screenings/{sid}/grade", None),
    ]
    for method, path, body in calls:
        assert client.open(path, method=method, headers=clinician, json=body).status_code < 300
    assert events(app, patient_id=pid) == [
        ("patient.create", "success", pid), ("screening.create", "success", sid),
        ("patient.read", "success", pid), ("patient.update", "success", pid),
        ("patient.summary.read", "success", pid), ("screening.list", "success", pid),
        ("screening.read", "success", sid), ("screening.image.read", "success", sid),
        ("screening.grade", "success", sid),
    ]
    with app.app_context():
        event = AuditEvent.select().order_by(AuditEvent.id.desc()).first()
        assert event.actor_prefix == clinician["Authorization"].split("_")[1]
        assert len(event.request_id) == 32


def test_listing_records_each_patient_shown(app, client, clinician):
    ids = [client.post("/api/v1/patients", headers=clinician, json={"name": f"L{i}"}).json["id"] for i in range(3)]
    client.get("/api/v1/patients", headers=clinician, query_string={"limit": 2})
    listed = [e for e in events(app) if e[0] == "patient.list"]
    assert listed == [("patient.list", "success", ids[2]), ("patient.list", "success", ids[1])]


def test_denied_and_missing_are_audited_too(app, client, make_key, patient):
    auditor = make_key("auditor")
    assert client.get(f"/api/v1/patients/{patient['id']}", headers=auditor).status_code == 403
    missing = "00000000-0000-4000-8000-000000000000"
    assert client.get(f"/api/v1/patients/{missing}", headers=make_key("clinician")).status_code == 404
    assert events(app, patient_id=patient["id"])[-1] == ("patient.read", "denied", patient["id"])
    assert events(app, patient_id=missing) == [("patient.read", "not_found", missing)]


def test_auditors_read_events_filtered_by_patient_with_cursor(client, clinician, patient, make_key):
    auditor = make_key("auditor")
    other = client.post("/api/v1/patients", headers=clinician, json={"name": "Other"}).json["id"]
    for _ in range(3):
        client.get(f"/api/v1/patients/{patient['id']}", headers=clinician)
    page = client.get("/api/v1/audit-events", headers=auditor, query_string={"patient_id": patient["id"], "limit": 2})
    assert page.status_code == 200
    items = page.json["items"]
    assert len(items) == 2 and all(e["patient_id"] == patient["id"] for e in items)
    assert items[0]["id"] > items[1]["id"]
    rest = client.get("/api/v1/audit-events", headers=auditor,
                      query_string={"patient_id": patient["id"], "cursor": page.json["next_cursor"]}).json
    assert [e["action"] for e in rest["items"]] == ["patient.read", "patient.create"]
    assert rest["next_cursor"] is None
    text = json.dumps(page.json) + json.dumps(rest)
    assert other not in text and patient["name"] not in text and "MRN" not in text


def test_audit_write_failure_withholds_the_data(app, client, clinician, patient, monkeypatch):
    import peewee

    def broken(*args, **kwargs):
        raise peewee.OperationalError("disk full")

    monkeypatch.setattr(AuditEvent, "insert_many", broken)
    response = client.get(f"/api/v1/patients/{patient['id']}", headers=clinician)
    assert response.status_code == 503
    assert response.json["error"]["code"] == "audit_unavailable"
    assert patient["name"] not in response.get_data(as_text=True)


def test_logs_hold_no_names_birth_dates_or_record_numbers(app, client, clinician, caplog, fake_torchserve):
    caplog.set_level(logging.DEBUG)
    phi = {"name": "Zebedee Quarternight", "birth_date": "1957-08-09", "medical_record_number": "MRN-77119"}
    pid = client.post("/api/v1/patients", headers=clinician, json=phi).json["id"]
    client.patch(f"/api/v1/patients/{pid}", headers=clinician, json={"name": "Zebedee Q. Quarternight"})
    client.post("/api/v1/patients", headers=clinician, json=phi)  # duplicate MRN: 409
    upload(client, clinician, pid, image_bytes())
    fake_torchserve.mode = "down"
    upload(client, clinician, pid, image_bytes(color=(1, 1, 1)))
    client.get(f"/api/v1/patients/{pid}/summary", headers=clinician)
    client.delete(f"/api/v1/patients/{pid}", headers=clinician)
    lines = [formatter().format(record) for record in caplog.records]
    assert len(lines) > 5
    for line in lines:
        for value in ("Zebedee", "Quarternight", "1957-08-09", "MRN-77119"):
            assert value not in line, line
    assert any(pid in line for line in lines)  # ids are logged instead
