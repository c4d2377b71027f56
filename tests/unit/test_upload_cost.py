"""The upload's own costs (issue 14): inference runs while the upload is stored, file parts stay
in memory, and the local backend makes the rename durable. A 201 still waits for everything."""
from __future__ import annotations

import os
import stat
import threading

import werkzeug.formparser
import werkzeug.wrappers.request

from control_api import storage as storage_mod
from control_api.models import Grading, Screening
from tests.plugins.api import upload
from tests.support.images import encode


def _photo(size=(900, 900)) -> bytes:
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)  # noise: a JPEG well over werkzeug's 500 kB spooling threshold
    return encode(Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)), "JPEG", quality=95)


def test_inference_overlaps_the_storage_write(app, client, clinician, patient, fake_torchserve, monkeypatch):
    """Each side waits for the other to have started: run one after the other, they would not
    see each other (and time out); the upload still answers 201 with everything stored."""
    storage = app.extensions["clarity"]["storage"]
    put_started, predict_started = threading.Event(), threading.Event()
    seen = {}
    real_put, real_predict = storage.put, fake_torchserve.predict

    def put(*args, **kw):
        put_started.set()
        seen["put saw predict"] = predict_started.wait(5)
        return real_put(*args, **kw)

    def predict(*args, **kw):
        predict_started.set()
        seen["predict saw put"] = put_started.wait(5)
        return real_predict(*args, **kw)

    monkeypatch.setattr(storage, "put", put)
    monkeypatch.setattr(fake_torchserve, "predict", predict)
    response = upload(client, clinician, patient["id"], encode_small())
    assert response.status_code == 201, response.json
    assert seen == {"put saw predict": True, "predict saw put": True}
    with app.app_context():
        row = Screening.get_by_id(response.json["id"])
        assert row.status == "graded" and Grading.select().where(Grading.screening == row.id).count() == 1
    assert storage.get(row.image_key, sha256=row.image_sha256)


def test_storage_failure_leaves_nothing_even_though_inference_started(app, client, clinician, patient,
                                                                      fake_torchserve, monkeypatch):
    storage = app.extensions["clarity"]["storage"]

    def down(*args, **kw):
        raise storage_mod.StorageUnavailable("disk gone")

    monkeypatch.setattr(storage, "put", down)
    response = upload(client, clinician, patient["id"], encode_small())
    assert response.status_code == 503
    with app.app_context():
        assert Screening.select().count() == 0 and Grading.select().count() == 0


def test_large_file_parts_are_not_spooled_to_disk(client, clinician, patient, monkeypatch):
    def no_temp_files(*args, **kw):
        raise AssertionError("the upload was spooled to a temporary file")

    monkeypatch.setattr(werkzeug.formparser, "default_stream_factory", no_temp_files)
    monkeypatch.setattr(werkzeug.wrappers.request, "default_stream_factory", no_temp_files)
    data = _photo()
    assert len(data) > 500_000
    response = upload(client, clinician, patient["id"], data)
    assert response.status_code == 201, response.json


def test_local_put_fsyncs_the_file_and_its_directory(tmp_path, monkeypatch):
    synced = []
    real = storage_mod.os.fsync

    def fsync(fd):
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        return real(fd)

    monkeypatch.setattr(storage_mod.os, "fsync", fsync)
    store = storage_mod.LocalStorage(tmp_path)
    data = b"fundus"
    store.put("screenings/abc", data, content_type="image/jpeg", sha256=storage_mod.sha256_hex(data))
    assert synced == [False, True]  # the file, then the directory holding the new name


def encode_small(color=(120, 40, 20)) -> bytes:
    from PIL import Image
    return encode(Image.new("RGB", (256, 256), color), "JPEG")


def test_an_upload_committed_while_another_waits_on_the_model_does_not_fail_it(app, clinician, patient,
                                                                                fake_torchserve, monkeypatch):
    """SQLite: the first upload's transaction read before the model was asked; a second upload
    commits while the first waits. The first must still write (not SQLITE_BUSY -> 503)."""
    real = fake_torchserve.predict
    answers = {}

    def predict(*args, **kw):
        if not answers:
            answers["second"] = None
            other = threading.Thread(target=lambda: answers.__setitem__(
                "second", upload(app.test_client(), clinician, patient["id"], encode_small(color=(9, 9, 9))).status_code))
            other.start()
            other.join()
        return real(*args, **kw)

    monkeypatch.setattr(fake_torchserve, "predict", predict)
    first = upload(app.test_client(), clinician, patient["id"], encode_small())
    assert answers["second"] == 201
    assert first.status_code == 201, first.json
