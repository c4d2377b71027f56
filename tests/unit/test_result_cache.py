"""The result cache: a re-sent photograph (same bytes, same patient, same default model version)
gets a copy of the stored grading without inference; anything else runs the model."""
from __future__ import annotations

from control_api import torchserve
from tests.plugins.api import image_bytes, upload


def _url(pid, sid, *rest):
    return "/".join([f"/api/v1/patients/{pid}/screenings/{sid}", *rest])


def test_a_resend_reuses_the_grading_without_inference(client, clinician, patient, fake_torchserve):
    data = image_bytes()
    first = upload(client, clinician, patient["id"], data)
    second = upload(client, clinician, patient["id"], data)
    assert first.status_code == second.status_code == 201
    assert len(fake_torchserve.calls) == 1
    assert second.json["id"] != first.json["id"]  # a photograph record of its own, with its image
    a, b = first.json["result"], second.json["result"]
    assert {k: v for k, v in b.items() if k not in ("id", "created_at", "timings_ms")} == \
        {k: v for k, v in a.items() if k not in ("id", "created_at", "timings_ms")}
    assert b["timings_ms"] == {"result_cache": "hit"}
    detail = client.get(_url(patient["id"], second.json["id"]), headers=clinician).json
    assert detail["status"] == "graded" and len(detail["gradings"]) == 1


def test_a_new_default_version_misses(client, clinician, patient, fake_torchserve):
    data = image_bytes()
    upload(client, clinician, patient["id"], data)
    fake_torchserve.default_version = "2.0"  # promoted
    response = upload(client, clinician, patient["id"], data)
    assert len(fake_torchserve.calls) == 2
    assert response.json["result"]["model"]["version"] == "2.0"
    fake_torchserve.default_version = "1.0"  # rolled back: 1.0's grading is valid again
    response = upload(client, clinician, patient["id"], data)
    assert len(fake_torchserve.calls) == 2
    assert response.json["result"]["model"]["version"] == "1.0"


def test_other_bytes_or_another_patient_run_the_model(client, clinician, patient, fake_torchserve):
    upload(client, clinician, patient["id"], image_bytes())
    upload(client, clinician, patient["id"], image_bytes(color=(121, 40, 20)))
    other = client.post("/api/v1/patients", headers=clinician, json={"name": "Other Testpatient"}).json
    upload(client, clinician, other["id"], image_bytes())
    assert len(fake_torchserve.calls) == 3


def test_an_ungradable_result_is_reused_too_but_a_regrade_always_runs(client, clinician, patient,
                                                                      fake_torchserve):
    fake_torchserve.mode = "ungradable"
    data = image_bytes()
    upload(client, clinician, patient["id"], data)
    second = upload(client, clinician, patient["id"], data)
    assert second.json["status"] == "ungradable" and len(fake_torchserve.calls) == 1
    response = client.post(_url(patient["id"], second.json["id"], "grade"), headers=clinician)
    assert response.status_code == 201 and len(fake_torchserve.calls) == 2


def test_when_the_default_is_unknown_nothing_is_reused(client, clinician, patient, fake_torchserve,
                                                        monkeypatch):
    monkeypatch.setattr(fake_torchserve, "default_model_version", lambda: None)
    data = image_bytes()
    upload(client, clinician, patient["id"], data)
    upload(client, clinician, patient["id"], data)
    assert len(fake_torchserve.calls) == 2


def test_the_client_reads_the_default_version_once_per_ttl(monkeypatch):
    client = torchserve.TorchServeClient("http://127.0.0.1:9", "http://127.0.0.1:9", "dr", 1.0)
    answers = [[{"modelVersion": "1.0"}], [{"modelVersion": "2.0"}]]
    monkeypatch.setattr(client, "describe", lambda: answers.pop(0))
    clock = [100.0]
    monkeypatch.setattr(torchserve.time, "monotonic", lambda: clock[0])
    assert client.default_model_version() == "1.0"
    clock[0] += torchserve.DEFAULT_VERSION_TTL_SECONDS / 2
    assert client.default_model_version() == "1.0"
    clock[0] += torchserve.DEFAULT_VERSION_TTL_SECONDS
    assert client.default_model_version() == "2.0"


def test_an_unreachable_management_api_means_no_cache(monkeypatch):
    client = torchserve.TorchServeClient("http://127.0.0.1:9", "http://127.0.0.1:9", "dr", 1.0)

    def down():
        raise torchserve.TorchServeUnavailable("down")

    monkeypatch.setattr(client, "describe", down)
    assert client.default_model_version() is None
