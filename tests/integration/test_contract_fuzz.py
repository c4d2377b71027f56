"""Contract fuzzing: Schemathesis generates requests from the API's own OpenAPI document
(/api/v1/openapi.json as the live server serves it) and sends them to the real API under
gunicorn (TorchServe with the tiny model, SeaweedFS S3, PostgreSQL) with an admin key, which
may call every endpoint. `case.call_and_validate()` runs Schemathesis's default checks on
each answer: no 5xx, the status documented, the content type documented, body and headers
valid against the documented schema, invalid data rejected and valid data accepted.

Each operation gets three runs of up to EXAMPLES cases: valid data with random UUIDs in the
path (mostly 404s), valid data naming a real patient and screening (2xx answers; not for
DELETE, which would delete them for the rest of the run), and invalid data. Every
operation's first failure is collected and the test fails listing them all.

Why not `schemathesis.pytest.from_fixture` + `@schema.parametrize()`: with pytest 9 its lazy
loader fails (`'Function' object has no attribute '_nodeid'`, schemathesis 4.32.5), so the
operations are driven here with `operation.as_strategy()` and Hypothesis's `@given`.
"""
from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.generation.modes import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance

from tests.support.harness import jpeg, new_patient, upload

pytestmark = pytest.mark.integration

EXAMPLES = 15

# Rules JSON Schema cannot state: a birth date between 1900 and today, captured_at not in the
# future, "give at least one field" on PATCH, an opaque cursor, what a decodable photograph is,
# which model versions are registered. A schema-valid request may break them; it must then get
# one of these answers and no other (this replaces Schemathesis's positive_data_acceptance,
# which expects every schema-valid request to succeed).
BEYOND_THE_SCHEMA = {"invalid_cursor", "unsupported_media_type", "empty_image", "undecodable_image",
                     "image_too_small", "image_too_large", "unknown_model_version",
                     # an exam_id in an upload form that names no exam, or another patient's
                     "exam_not_found", "exam_of_another_patient"}
FIELDS_BEYOND_THE_SCHEMA = {"birth_date", "captured_at", "performed_at", "_schema"}


def rejected_only_beyond_the_schema(ctx, response, case):
    if response.status_code < 400 or response.status_code in (401, 403, 404, 409, 429):
        return True
    error = response.json()["error"]
    if error["code"] == "invalid_request" and error.get("details"):
        fields = {name for where in error["details"].values() for name in where}
        assert fields <= FIELDS_BEYOND_THE_SCHEMA, f"schema-valid fields rejected: {error['details']}"
        return True
    assert error["code"] in BEYOND_THE_SCHEMA, f"schema-valid request rejected: {response.status_code} {error}"
    return True


@pytest.fixture(scope="module")
def fuzz_stack(make_stack):
    stack = make_stack(name="fuzz")
    admin = stack.key("admin")
    patient = new_patient(stack, admin, "fuzz")
    screening = upload(stack, admin, patient, jpeg(seed=7))
    assert screening.status_code == 201, screening.text
    return stack, admin, {"patient_id": patient, "screening_id": screening.json()["id"],
                          "exam_id": screening.json()["exam_id"]}


def runs(operation, real_ids: dict):
    """(name, strategy, checks) for each run of one operation."""
    positive = {"excluded_checks": [positive_data_acceptance], "additional_checks": [rejected_only_beyond_the_schema]}
    yield "positive", operation.as_strategy(GenerationMode.POSITIVE), positive
    names = {p.name for p in operation.path_parameters}
    if names and operation.method.upper() != "DELETE":
        fixed = {k: v for k, v in real_ids.items() if k in names}
        yield "positive, real ids", operation.as_strategy(GenerationMode.POSITIVE, path_parameters=fixed), positive
    yield "negative", operation.as_strategy(GenerationMode.NEGATIVE), {}


def refused_by_gunicorn(response) -> bool:
    """gunicorn answers a request line over limit_request_line (4094 bytes) itself, with 414 and
    an HTML page, before the app sees it: outside the document (see docs/guarantees.md)."""
    line = len(response.request.method) + len(response.request.path_url) + len(" HTTP/1.1") + 1
    return response.status_code == 414 and line > 4094


def describe(exc: BaseException) -> str:
    # A FailureGroup's message holds each failed check, the response and a curl command.
    return f"{type(exc).__name__}: {str(exc)[:3000]}"


def headline(failure: str) -> str:
    label = failure.split(":", 1)[0]
    checks = [line.strip() for line in failure.splitlines() if line.startswith("- ")]
    return f"{label}: {'; '.join(checks) or failure.splitlines()[0][len(label):][:200]}"


def test_api_matches_its_openapi_document(fuzz_stack):
    stack, admin, real_ids = fuzz_stack
    schema = schemathesis.openapi.from_url(f"{stack.url}/api/v1/openapi.json", timeout=30)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 14
    failures, calls, statuses = [], [], {}

    for operation in operations:
        for name, strategy, checks in runs(operation, real_ids):
            @given(case=strategy)
            @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                      phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
            def check(case):
                calls.append(operation.label)
                response = case.call(base_url=stack.url, headers=admin, timeout=60)
                statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
                if refused_by_gunicorn(response):
                    return
                case.validate_response(response, headers=admin, transport_kwargs={"base_url": stack.url}, **checks)

            try:
                check()
            except Unsatisfiable:
                assert name == "negative", operation.label  # nothing to make invalid: no parameters, no body
            except (Exception, BaseExceptionGroup) as exc:  # Schemathesis's FailureGroup is a BaseExceptionGroup
                failures.append(f"{operation.label} [{name}]: {describe(exc)}")

    assert not failures, (f"{len(failures)} failing runs:\n" + "\n".join(map(headline, failures))
                          + "\n\n" + "\n\n".join(failures))
    assert len(calls) >= 3 * len(operations)  # the runs really sent requests
    print(f"\nschemathesis: {len(operations)} operations, {len(calls)} requests, statuses {sorted(statuses.items())}")
