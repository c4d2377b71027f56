"""The storage promises of tests/unit/test_api_storage.py, kept by S3Storage against a real SeaweedFS
server, plus what only S3 does (encryption at rest, checksums, presigned URLs)."""
import base64

import pytest
import requests

from control_api.storage import IntegrityError, S3Storage, StorageUnavailable
from tests.unit.test_api_storage import DATA, SHA, key
from tests.unit.test_api_storage import (  # noqa: F401  (collected here with the S3 `storage` below)
    test_delete, test_keys_cannot_escape, test_missing_object, test_put_get_roundtrip_and_list,
    test_put_refuses_bytes_that_do_not_match_their_hash, test_read_verifies_the_hash)

pytestmark = pytest.mark.integration


@pytest.fixture
def storage(s3_server, monkeypatch):
    return s3_storage(s3_server, monkeypatch)


def s3_storage(server, monkeypatch, **kwargs):
    """The backend as the app builds it, credentials from the environment like boto3 reads them."""
    for name, value in server.settings_env().items():
        if name.startswith("AWS_"):
            monkeypatch.setenv(name, value)
    return S3Storage(server.bucket, region="us-east-1", endpoint_url=server.endpoint_url, **kwargs)


def test_s3_encrypts_checksums_and_presigns(s3_server, monkeypatch):
    client = s3_server.client()
    storage = s3_storage(s3_server, monkeypatch, presign_ttl=60)
    k = key()
    storage.put(k, DATA, content_type="image/jpeg", sha256=SHA)
    head = client.head_object(Bucket=s3_server.bucket, Key=k, ChecksumMode="ENABLED")
    assert head["ServerSideEncryption"] == "AES256"
    assert head["ContentType"] == "image/jpeg"
    assert head["ChecksumSHA256"] == base64.b64encode(bytes.fromhex(SHA)).decode()
    url = storage.download_url(k, content_type="image/jpeg")
    assert k in url and "X-Amz-Expires=60" in url
    response = requests.get(url, timeout=10)
    assert response.status_code == 200 and response.content == DATA
    assert response.headers["Content-Type"] == "image/jpeg"
    # Someone overwrites the object behind the API's back: the read notices.
    client.put_object(Bucket=s3_server.bucket, Key=k, Body=b"replaced")
    with pytest.raises(IntegrityError):
        storage.get(k, sha256=SHA)


def test_s3_unreachable_is_storage_unavailable(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    storage = S3Storage("clarity-images", region="us-east-1", endpoint_url="http://127.0.0.1:1")
    with pytest.raises(StorageUnavailable):
        storage.check()
    with pytest.raises(StorageUnavailable):
        storage.put(key(), DATA, content_type="image/jpeg", sha256=SHA)
