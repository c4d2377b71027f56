"""Both storage backends keep the same promises: here the local folder; the same tests run against a real
SeaweedFS S3 server in tests/integration/test_api_storage_s3.py."""
import hashlib
import os
import uuid

import pytest

from control_api.storage import ObjectCorrupted, LocalStorage, ObjectMissing, StorageUnavailable

DATA = b"\xff\xd8\xff fundus bytes " * 100
SHA = hashlib.sha256(DATA).hexdigest()


@pytest.fixture
def storage(tmp_path):
    return LocalStorage(tmp_path / "images")


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
    with pytest.raises(ObjectCorrupted):
        storage.put(k, DATA, content_type="image/jpeg", sha256="0" * 64)
    with pytest.raises(ObjectMissing):
        storage.get(k, sha256=None)


def test_read_verifies_the_hash(storage):
    k = key()
    storage.put(k, DATA, content_type="image/jpeg", sha256=SHA)
    with pytest.raises(ObjectCorrupted):
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
    with pytest.raises(ObjectCorrupted):
        storage.get(k, sha256=SHA)
    assert storage.download_url(k, content_type="image/jpeg") is None  # local images stream through the API


def test_a_photograph_is_hashed_once_per_thread_but_other_bytes_always(monkeypatch):
    import control_api.storage as storage_mod
    calls = []
    real = hashlib.sha256
    monkeypatch.setattr(storage_mod.hashlib, "sha256", lambda data: calls.append(len(data)) or real(data))
    photo = os.urandom(200_000)
    digest = storage_mod.sha256_hex(photo)
    assert storage_mod.sha256_hex(photo) == digest and calls == [200_000]  # the same object: remembered
    copy = bytes(bytearray(photo))
    assert copy is not photo and storage_mod.sha256_hex(copy) == digest and len(calls) == 2
    changed = photo[:-1] + b"!"
    assert storage_mod.sha256_hex(changed) == real(changed).hexdigest() and len(calls) == 3
