"""Error shape, request ids, security headers, CORS, probes and metrics."""
import dataclasses

import peewee

from control_api import create_app
from tests.plugins.api import image_bytes, upload


def assert_error(response, status, code=None):
    assert response.status_code == status
    assert response.mimetype == "application/json"
    error = response.json["error"]
    assert set(error) >= {"code", "message", "request_id"}
    assert error["request_id"] == response.headers["X-Request-ID"]
    if code:
        assert error["code"] == code
    assert "Traceback" not in response.get_data(as_text=True) and "<html" not in response.get_data(as_text=True)


def test_unknown_url_is_json_404(client):
    assert_error(client.get("/nowhere"), 404, "not_found")


def test_wrong_method_is_json_405_with_allow(client, clinician):
    response = client.put("/api/v1/patients", headers=clinician)
    assert_error(response, 405, "method_not_allowed")
    assert "POST" in response.headers["Allow"]


def test_unexpected_exception_is_json_500_without_details(app, client, clinician, patient, monkeypatch, caplog):
    from control_api.blueprints import patients

    def boom(*args, **kwargs):  # exception text quoting request data must reach neither client nor log
        raise RuntimeError(f"while reading {patient['name']}")

    monkeypatch.setattr(patients.Patient, "select", boom)
    response = client.get("/api/v1/patients", headers=clinician)
    assert_error(response, 500, "internal_error")
    assert patient["name"] not in response.get_data(as_text=True)
    assert any(getattr(r, "error_type", None) == "RuntimeError" for r in caplog.records)
    assert not any(patient["name"] in r.getMessage() or patient["name"] in str(r.__dict__)
                   for r in caplog.records)


def test_database_down_is_503(client, clinician, monkeypatch):
    from control_api.blueprints import patients

    def down(*args, **kwargs):
        raise peewee.OperationalError("could not connect to server")

    monkeypatch.setattr(patients.Patient, "select", down)
    response = client.get("/api/v1/patients", headers=clinician)
    assert_error(response, 503, "database_unavailable")
    assert response.headers["Retry-After"]


def test_unreachable_database_is_503(api_settings, fake_torchserve):
    app = create_app(dataclasses.replace(api_settings, database_url="postgresql://nobody@127.0.0.1:1/none"),
                     torchserve=fake_torchserve)
    client = app.test_client()
    response = client.get("/api/v1/patients", headers={"Authorization": "Bearer cic_00000000_x"})
    assert_error(response, 503, "database_unavailable")
    assert client.get("/healthz").status_code == 200  # liveness does not touch the database


def test_request_id_is_the_servers_own(client):
    """The client's X-Request-ID is only logged beside it: it never becomes the id of audit rows."""
    seen = set()
    for sent in ("abc-123.X_y:z", "abc-123.X_y:z", "has space", "x" * 65, "<script>", ""):
        answered = client.get("/healthz", headers={"X-Request-ID": sent}).headers["X-Request-ID"]
        assert answered != sent and len(answered) == 32 and answered not in seen
        seen.add(answered)


def test_security_headers(client, clinician, patient):
    response = client.get(f"/api/v1/patients/{patient['id']}", headers=clinician)
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["X-Frame-Options"] == "DENY"
    assert response.headers["Referrer-Policy"] == "no-referrer"
    assert "frame-ancestors 'none'" in response.headers["Content-Security-Policy"]
    assert response.headers["Cache-Control"] == "no-store"
    assert_error(client.get("/nowhere"), 404)
    assert client.get("/nowhere").headers["X-Frame-Options"] == "DENY"


def test_openapi_document_and_docs_page_are_public(client):
    spec = client.get("/api/v1/openapi.json")
    assert spec.status_code == 200
    paths = spec.json["paths"]
    assert "/api/v1/patients/{patient_id}/screenings" in paths
    upload_op = paths["/api/v1/patients/{patient_id}/screenings"]["post"]
    assert "multipart/form-data" in upload_op["requestBody"]["content"]
    assert upload_op["security"] == [{"bearerAuth": []}]
    assert spec.json["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    docs = client.get("/api/v1/docs")
    assert docs.status_code == 200 and b"swagger" in docs.data.lower()


def test_cors_allows_only_configured_origins(api_settings, fake_torchserve):
    app = create_app(dataclasses.replace(api_settings, cors_origins=("https://clinic.example",)),
                     torchserve=fake_torchserve)
    client = app.test_client()
    preflight = client.options("/api/v1/patients", headers={
        "Origin": "https://clinic.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "Authorization, Idempotency-Key"})
    assert preflight.status_code == 200
    assert preflight.headers["Access-Control-Allow-Origin"] == "https://clinic.example"
    assert "idempotency-key" in preflight.headers["Access-Control-Allow-Headers"].lower()
    other = client.options("/api/v1/patients", headers={"Origin": "https://evil.example",
                                                        "Access-Control-Request-Method": "POST"})
    assert "Access-Control-Allow-Origin" not in other.headers


def test_no_cors_headers_without_configured_origins(client):
    response = client.get("/healthz", headers={"Origin": "https://clinic.example"})
    assert "Access-Control-Allow-Origin" not in response.headers


def test_healthz_and_readyz(app, client, fake_torchserve, make_key):
    admin = make_key("admin")
    assert client.get("/healthz").json == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json == {"status": "ready"}
    fake_torchserve.mode = "down"
    app.extensions["clarity"].pop("readiness", None)  # readyz answers from a 5 s cache
    response = client.get("/readyz")
    assert_error(response, 503, "not_ready")
    assert "checks" not in response.json and "torchserve" not in response.json["error"]["message"]
    details = client.get("/api/v1/readiness", headers=admin)  # the names are for admins
    assert_error(details, 503, "not_ready")
    assert details.json["checks"]["torchserve"]["ok"] is False
    assert details.json["checks"]["database"]["ok"] is True
    assert "torchserve" in details.json["error"]["message"]


def test_readyz_names_an_old_schema(make_app):
    from control_api.auth import create_key

    app = make_app(schema=1)
    assert app.test_client().get("/readyz").status_code == 503
    with app.app_context():
        _, token = create_key("admin")
    response = app.test_client().get("/api/v1/readiness", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 503
    assert "version 1" in response.json["checks"]["database"]["problem"]


def test_readyz_names_unreachable_storage(app, client, monkeypatch, make_key):
    admin = make_key("admin")
    from control_api.storage import StorageUnavailable

    def down():
        raise StorageUnavailable("nope")

    monkeypatch.setattr(app.extensions["clarity"]["storage"], "check", down)
    assert client.get("/readyz").status_code == 503
    response = client.get("/api/v1/readiness", headers=admin)
    assert response.status_code == 503 and response.json["checks"]["storage"]["ok"] is False


def test_metrics_use_route_templates_never_ids(client, clinician, patient, fake_torchserve):
    upload(client, clinician, patient["id"], image_bytes())
    client.get(f"/api/v1/patients/{patient['id']}", headers=clinician)
    client.get("/no/such/path/Ada")
    text = client.get("/metrics").get_data(as_text=True)
    assert 'route="/api/v1/patients/<uuid:patient_id>"' in text
    assert 'clarity_screenings_total{outcome="graded"}' in text
    assert 'route="<unmatched>"' in text
    assert patient["id"] not in text and "Ada" not in text and "MRN" not in text


def test_models_lists_versions(client, make_key, fake_torchserve):
    response = client.get("/api/v1/models", headers=make_key("admin"))
    assert response.status_code == 200
    assert response.json["default_version"] == "1.0"
    assert [v["version"] for v in response.json["versions"]] == ["1.0", "2.0"]
    fake_torchserve.mode = "down"
    assert_error(client.get("/api/v1/models", headers=make_key("admin")), 503, "model_server_unavailable")
