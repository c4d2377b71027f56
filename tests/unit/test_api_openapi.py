"""Property-based run over the OpenAPI document (schemathesis + hypothesis): no generated
request, valid or not, gets a server error or an error outside the JSON error shape."""
import schemathesis
from hypothesis import HealthCheck, given, settings


def test_no_server_errors_and_only_json_errors(app, make_key):
    headers = make_key("admin")
    schema = schemathesis.openapi.from_wsgi("/api/v1/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 14

    for operation in operations:
        @given(case=operation.as_strategy())
        @settings(max_examples=10, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def check(case):
            case.headers = {**(case.headers or {}), **headers}
            response = case.call()
            where = (case.method, case.formatted_path, response.status_code)
            assert response.status_code < 500, (*where, response.text)
            if response.status_code >= 400:
                error = response.json()["error"]
                assert error["code"] and error["message"] and error["request_id"], where

        check()
