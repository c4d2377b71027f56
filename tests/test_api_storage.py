"""Both storage backends keep the same promises; S3 is checked against a real SeaweedFS server."""
import base64
import hashlib
import uuid

import pytest
import requests

from control_api.storage import IntegrityError, LocalStorage, ObjectMissing, S3Storage, StorageUnavailable

DATA = b"\xff\xd8\xff fundus bytes " * 100
SHA = hashlib.sha256(DATA).hexdigest()


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.integration)])
def storage(request, tmp_path):
    if request.param == "local":
        return LocalStorage(tmp_path / "images")
    return s3_storage(request.getfixturevalue("s3_server"), request.getfixturevalue("monkeypatch"))


def s3_storage(server, monkeypatch, **kwargs):
    """The backend as the app builds it, credentials from the environment like boto3 reads them."""
    for name, value in server.settings_env().items():
        if name.startswith("AWS_"):
            monkeypatch.setenv(name, value)
    return S3Storage(server.bucket, region="us-east-1", endpoint_url=server.endpoint_url, **kwargs)


def key():
    return f"screenings/{uuid.uuid4()}"


def test_put_get_roundtrip_and_list(storage):
    k = key()
    storage.put(k, DATA, content_type="image/jpeg", sha256=SHA)
    assert storage.get(k, sha256=SHA) == DATA
    assert k in [o.key for o in storage.list("screenings/")]
    storage.check()


def test_missing_object(storage):
    with pytest.raises(ObjectMissing):
        storage.get(key(), sha256=SHA)
    storage.delete(key())  # deleting what is not there is fine


def test_delete(storage):
    k = key()
    storage.put(k, DATA, content_type="image/jpeg", sha256=SHA)
    storage.delete(k)
    with pytest.raises(ObjectMissing):
        storage.get(k, sha256=SHA)


def test_put_refuses_bytes_that_do_not_match_their_hash(storage):
    k = key()
    with pytest.raises(IntegrityError):
        storage.put(k, DATA, content_type="image/jpeg", sha256="0" * 64)
    with pytest.raises(ObjectMissing):
        storage.get(k, sha256=None)


def test_read_verifies_the_hash(storage):
    k = key()
    storage.put(k, DATA, content_type="image/jpeg", sha256=SHA)
    with pytest.raises(IntegrityError):
        storage.get(k, sha256=hashlib.sha256(b"other").hexdigest())


@pytest.mark.parametrize("bad", ["../etc/passwd", "/abs/path", "screenings/../../x", "screenings/A B", "",
                                 "screenings//x", "screenings/x/"])
def test_keys_cannot_escape(storage, bad):
    with pytest.raises(ValueError):
        storage.put(bad, DATA, content_type="image/jpeg", sha256=SHA)


def test_local_writes_are_atomic(tmp_path, monkeypatch):
    storage = LocalStorage(tmp_path)
    k = key()
    storage.put(k, DATA, content_type="image/jpeg", sha256=SHA)

    def crash(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("os.replace", crash)
    with pytest.raises(StorageUnavailable):
        storage.put(k, b"new" + DATA, content_type="image/jpeg", sha256=hashlib.sha256(b"new" + DATA).hexdigest())
    assert storage.get(k, sha256=SHA) == DATA  # the old bytes, whole
    assert [p.name for p in (tmp_path / "screenings").iterdir()] == [k.split("/")[1]]  # no temp file left


def test_local_detects_tampering(tmp_path):
    storage = LocalStorage(tmp_path)
    k = key()
    storage.put(k, DATA, content_type="image/jpeg", sha256=SHA)
    (tmp_path / k).write_bytes(DATA[:-1] + b"!")
    with pytest.raises(IntegrityError):
        storage.get(k, sha256=SHA)
    assert storage.download_url(k, content_type="image/jpeg") is None  # local images stream through the API


@pytest.mark.integration
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


@pytest.mark.integration
def test_s3_unreachable_is_storage_unavailable(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    storage = S3Storage("clarity-images", region="us-east-1", endpoint_url="http://127.0.0.1:1")
    with pytest.raises(StorageUnavailable):
        storage.check()
    with pytest.raises(StorageUnavailable):
        storage.put(key(), DATA, content_type="image/jpeg", sha256=SHA)
