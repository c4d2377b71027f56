"""Every route is closed unless declared public, and roles are enforced. The route list comes
from the app's URL map, so a route added without an access rule fails here."""
import re
import uuid

import pytest

from control_api.auth import CLINICAL, PUBLIC
from control_api.models import ApiKey
from tests.plugins.api import bearer, image_bytes, upload

PUBLIC_ENDPOINTS = {"health.healthz", "health.readyz", "health.scrape", "api-docs.openapi_json",
                    "swagger_ui.page", "swagger_ui.asset",
                    "console.root", "console.index", "console.asset"}
ROLES = ("clinician", "admin", "auditor")
# Who may call each endpoint. A new endpoint must be added here, deliberately.
EXPECTED = {
    "patients.create_patient": CLINICAL, "patients.list_patients": CLINICAL,
    "patients.read_patient": CLINICAL, "patients.update_patient": CLINICAL,
    "patients.delete_patient": CLINICAL, "patients.patient_summary": CLINICAL,
    "screenings.create_screening": CLINICAL, "screenings.list_screenings": CLINICAL,
    "screenings.read_screening": CLINICAL, "screenings.read_image": CLINICAL, "screenings.regrade": CLINICAL,
    "exams.create_exam": CLINICAL, "exams.list_exams": CLINICAL, "exams.read_exam": CLINICAL,
    "exams.add_image": CLINICAL, "exams.read_report": CLINICAL, "exams.read_fhir": CLINICAL,
    "screenings.read_explanation": CLINICAL,
    "models.list_models": ("admin",), "health.readiness_details": ("admin",),
    "shadow.read_shadow": ("admin",), "shadow.start_shadow": ("admin",), "shadow.stop_shadow": ("admin",),
    "shadow.shadow_report": ("admin",), "shadow.read_shadow_grading": ("admin",),
    "audit.list_events": ("auditor", "admin"),
}


def routes(app):
    """(endpoint, method, concrete URL) for every rule and method of the app."""
    for rule in app.url_map.iter_rules():
        values = {name: uuid.uuid4() for name in rule.arguments}
        path = re.sub(r"<(?:\w+:)?(\w+)>", lambda m: str(values[m.group(1)]), rule.rule)
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            yield rule.endpoint, method, path


def test_every_endpoint_is_known(app):
    endpoints = {rule.endpoint for rule in app.url_map.iter_rules()}
    assert endpoints == PUBLIC_ENDPOINTS | set(EXPECTED)


def test_every_endpoint_declares_its_roles(app):
    for endpoint, view in app.view_functions.items():
        if endpoint.startswith("api-docs."):
            continue
        declared = getattr(view, "_roles", None)
        expected = PUBLIC if endpoint in PUBLIC_ENDPOINTS else EXPECTED[endpoint]
        assert declared == expected, endpoint


def test_without_a_key_every_private_route_is_401(app, client):
    for endpoint, method, path in routes(app):
        response = client.open(path, method=method)
        if endpoint in PUBLIC_ENDPOINTS:
            assert response.status_code != 401, (method, path)
            continue
        assert response.status_code == 401, (method, path)
        assert response.json["error"]["code"] == "unauthorized"
        assert response.headers["WWW-Authenticate"].startswith("Bearer")


@pytest.mark.parametrize("header", ["Bearer", "Bearer nonsense", "Basic dXNlcjpwYXNz", "Bearer cic_ffffffff_x",
                                    "Token cic_1_2"])
def test_bad_keys_are_401(client, header):
    response = client.get("/api/v1/patients", headers={"Authorization": header})
    assert response.status_code == 401


def test_a_key_with_a_wrong_secret_is_401(client, clinician):
    token = clinician["Authorization"].split()[1]
    forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    assert client.get("/api/v1/patients", headers={"Authorization": f"Bearer {forged}"}).status_code == 401


def test_roles_are_enforced_on_every_route(app, client, make_key):
    keys = {role: make_key(role) for role in ROLES}
    for endpoint, method, path in routes(app):
        if endpoint in PUBLIC_ENDPOINTS:
            continue
        for role in ROLES:
            response = client.open(path, method=method, headers=keys[role])
            if role in EXPECTED[endpoint]:
                # Allowed: whatever it says (404 for the random ids, 422 for no body), never 401/403.
                assert response.status_code not in (401, 403), (role, method, path, response.json)
            else:
                assert response.status_code == 403, (role, method, path)
                assert response.json["error"]["code"] == "forbidden"


def test_forbidden_is_decided_before_the_body_is_read(app, client, make_key, patient, clinician):
    response = upload(client, make_key("auditor"), patient["id"], image_bytes())
    assert response.status_code == 403
    assert app.extensions["clarity"]["storage"].root.exists() is False or not list(
        app.extensions["clarity"]["storage"].list())


def test_unknown_endpoint_without_rule_is_closed(make_app):
    app = make_app()

    @app.get("/api/v1/forgotten")
    def forgotten():
        return {"secret": True}

    headers = bearer(app, "admin")
    client = app.test_client()
    assert client.get("/api/v1/forgotten").status_code == 401
    assert client.get("/api/v1/forgotten", headers=headers).status_code == 403


def test_cli_creates_lists_and_revokes_keys(app, client):
    runner = app.test_cli_runner()
    result = runner.invoke(args=["keys", "create", "--role", "clinician", "--label", "frontend"])
    assert result.exit_code == 0, result.output
    token = result.stdout.strip()
    assert re.fullmatch(r"cic_[0-9a-f]{8}_[A-Za-z0-9_-]{43}", token)
    prefix = token.split("_")[1]
    with app.app_context():
        key = ApiKey.get(ApiKey.prefix == prefix)
        assert token not in (key.key_hash, key.label) and len(key.key_hash) == 64
    headers = {"Authorization": f"Bearer {token}"}
    assert client.get("/api/v1/patients", headers=headers).status_code == 200

    listing = runner.invoke(args=["keys", "list"])
    assert prefix in listing.output and "frontend" in listing.output and token not in listing.output

    assert runner.invoke(args=["keys", "revoke", prefix]).exit_code == 0
    response = client.get("/api/v1/patients", headers=headers)
    assert response.status_code == 401 and "revoked" in response.json["error"]["message"]
    assert runner.invoke(args=["keys", "revoke", prefix]).exit_code != 0
    assert "revoked" in runner.invoke(args=["keys", "list"]).output


def test_cli_refuses_unknown_roles(app):
    result = app.test_cli_runner().invoke(args=["keys", "create", "--role", "root"])
    assert result.exit_code != 0
