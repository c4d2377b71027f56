"""control_api/torchserve_keys.py without a TorchServe (tests/integration/test_torchserve_keys.py
runs it against a real one): what counts as a refused key, and what an absent key file says."""
import json

import pytest
import requests

from control_api.torchserve_keys import KeyFileError, TorchServeKeys, refused


def answer(status: int, body) -> requests.Response:
    response = requests.Response()
    response.status_code = status
    response._content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return response


def test_only_invalid_key_exception_is_a_refused_key():
    assert refused(answer(400, {"code": 400, "type": "InvalidKeyException", "message": "..."}))
    assert not refused(answer(400, {"code": "quality_rejected", "message": "..."}))  # the handler's own 400
    assert not refused(answer(400, b"not json"))
    assert not refused(answer(404, {"type": "InvalidKeyException"}))


def test_no_key_file_sends_no_key_and_cannot_renew():
    keys = TorchServeKeys("", "http://127.0.0.1:9")
    assert keys.key("inference") is None and keys.headers(None) == {}
    with pytest.raises(KeyFileError, match="TORCHSERVE_KEY_FILE"):
        keys.renew("inference", None)


def test_keys_are_read_and_never_quoted(tmp_path):
    path = tmp_path / "key_file.json"
    path.write_text(json.dumps({"management": {"key": "mgmtKEY1", "expiration time": "x"},
                                "inference": {"key": "infKEY22", "expiration time": "x"}, "API": {"key": "apiKEY33"}}))
    keys = TorchServeKeys(path, "http://127.0.0.1:9")
    assert keys.key("inference") == "infKEY22" and keys.key("management") == "mgmtKEY1"
    assert keys.headers("infKEY22") == {"Authorization": "Bearer infKEY22"}
    path.write_text("{not json")
    with pytest.raises(KeyFileError) as info:
        TorchServeKeys(path, "http://127.0.0.1:9").key("inference")
    assert str(path) in str(info.value) and "KEY" not in str(info.value).replace(str(path), "")
