"""Shadow grading through the API, with the fake TorchServe: a candidate grades in the
background, its answers are kept apart, and no clinical read ever shows them."""
import random
import threading

import pytest
from prometheus_client import REGISTRY

from control_api import agreement, shadow
from control_api.models import Grading, ShadowGrading
from control_api.torchserve import TorchServeUnavailable
from tests.plugins.api import image_bytes, upload

SHADOW = "/api/v1/models/shadow"


@pytest.fixture
def admin(make_key):
    return make_key("admin")


def drain(app):
    app.extensions["clarity"]["shadow"].drain()


def clinical_view(client, headers, patient_id, screening_id):
    base = f"/api/v1/patients/{patient_id}"
    return (client.get(f"{base}/screenings/{screening_id}", headers=headers).json,
            client.get(f"{base}/screenings", headers=headers).json,
            client.get(f"{base}/summary", headers=headers).json)


def sample(name, **labels):
    return REGISTRY.get_sample_value(name, labels) or 0


def test_shadow_grades_in_the_background_and_no_clinical_read_shows_it(app, client, clinician, admin, patient,
                                                                        fake_torchserve):
    fake_torchserve.version_grades["2.0"] = 3  # the candidate would refer; the default would not
    response = client.put(SHADOW, headers=admin, json={"version": "2.0"})
    assert response.status_code == 200, response.json
    assert response.json["active"]["version"] == "2.0" and response.json["active"]["sample_rate"] == 1.0
    graded_before = sample("clarity_shadow_gradings_total", outcome="graded")

    created = upload(client, clinician, patient["id"], image_bytes())
    assert created.status_code == 201 and created.json["result"]["model"]["version"] == "1.0"
    drain(app)
    with app.app_context():
        rows = list(ShadowGrading.select())
        assert [(r.model_version, r.grade, r.source) for r in rows] == [("2.0", 3, "shadow")]
        assert Grading.select().count() == 1 and rows[0].baseline_id == Grading.get().id
    assert [c["version"] for c in fake_torchserve.calls] == [None, "2.0"]
    assert sample("clarity_shadow_gradings_total", outcome="graded") == graded_before + 1

    detail, listing, summary = clinical_view(client, clinician, patient["id"], created.json["id"])
    assert [g["model"]["version"] for g in detail["gradings"]] == ["1.0"]
    assert detail["result"]["grade"] == 1 and listing["items"][0]["result"]["grade"] == 1
    assert summary["outcome"] == "rescreen_12_months" or summary["outcome"] == "retake"
    for view in (detail, listing, summary):
        assert "'version': '2.0'" not in str(view) and "'grade': 3" not in str(view)


def test_the_clinical_answers_are_the_same_with_shadow_on_and_off(make_app, fake_torchserve):
    fake_torchserve.version_grades["2.0"] = 4
    views = []
    for shadow_on in (False, True):
        app = make_app()
        client = app.test_client()
        from tests.plugins.api import bearer
        clinician, admin = bearer(app, "clinician"), bearer(app, "admin")
        if shadow_on:
            assert client.put(SHADOW, headers=admin, json={"version": "2.0"}).status_code == 200
        patient = client.post("/api/v1/patients", headers=clinician, json={"name": "Same Patient"}).json
        ids = [upload(client, clinician, patient["id"], image_bytes(color=color), eye=eye).json["id"]
               for eye, color in (("left", (120, 40, 20)), ("right", (40, 120, 20)))]
        app.extensions["clarity"]["shadow"].drain()
        view = [clinical_view(client, clinician, patient["id"], i) for i in ids]
        views.append(_strip_ids(view))
        with app.app_context():
            assert ShadowGrading.select().count() == (2 if shadow_on else 0)
    assert views[0] == views[1]


def _strip_ids(value):
    """The same content apart from ids and times, which differ between two runs."""
    if isinstance(value, dict):
        return {k: _strip_ids(v) for k, v in value.items()
                if not (k == "id" or k.endswith("_id") or k.endswith("_at") or k in ("url", "image", "next_cursor"))}
    if isinstance(value, (list, tuple)):
        return [_strip_ids(v) for v in value]
    return value


def test_a_result_cache_hit_is_not_offered_to_shadow(app, client, clinician, admin, patient, fake_torchserve):
    """The same bytes sent again are answered from the cache (no inference) and not graded again by
    the candidate: they were offered the first time, and the report counts each photograph once."""
    fake_torchserve.version_grades["2.0"] = 3
    client.put(SHADOW, headers=admin, json={"version": "2.0"})
    first = upload(client, clinician, patient["id"], image_bytes(), eye="left")
    again = upload(client, clinician, patient["id"], image_bytes(), eye="right")
    drain(app)
    assert again.status_code == 201 and again.json["result"]["grade"] == first.json["result"]["grade"]
    assert [c["version"] for c in fake_torchserve.calls] == [None, "2.0"]
    with app.app_context():
        assert [str(r.screening_id) for r in ShadowGrading.select()] == [first.json["id"]]


def test_shadow_of_a_dicom_photograph_gets_the_model_input(app, client, clinician, admin, patient, fake_torchserve):
    """The candidate reads what the default read (the JPEG frame), never the DICOM file."""
    from tests.plugins.dicom import op_file, small_jpeg
    from tests.unit.test_dicom_upload import MRN, send

    client.put(SHADOW, headers=admin, json={"version": "2.0"})
    assert send(client, clinician, patient["id"], op_file(small_jpeg(3), patient_id=MRN)).status_code == 201
    drain(app)
    assert [(c["version"], c["content_type"]) for c in fake_torchserve.calls] == \
        [(None, "image/jpeg"), ("2.0", "image/jpeg")]
    assert fake_torchserve.calls[0]["bytes"] == fake_torchserve.calls[1]["bytes"]


def test_putting_in_shadow_is_for_admins_and_registered_candidates(client, clinician, admin):
    assert client.put(SHADOW, headers=clinician, json={"version": "2.0"}).status_code == 403
    unknown = client.put(SHADOW, headers=admin, json={"version": "9.9"})
    assert unknown.status_code == 422 and unknown.json["error"]["code"] == "unknown_model_version"
    default = client.put(SHADOW, headers=admin, json={"version": "1.0"})
    assert default.status_code == 422 and default.json["error"]["code"] == "already_default"
    bad_rate = client.put(SHADOW, headers=admin, json={"version": "2.0", "sample_rate": 0})
    assert bad_rate.status_code == 422
    assert client.get(SHADOW, headers=admin).json["active"] is None
    assert client.delete(SHADOW, headers=admin).status_code == 404


def test_stopping_shadow_stops_the_grading(app, client, clinician, admin, patient, fake_torchserve):
    client.put(SHADOW, headers=admin, json={"version": "2.0"})
    assert client.delete(SHADOW, headers=admin).status_code == 204
    upload(client, clinician, patient["id"], image_bytes())
    drain(app)
    assert [c["version"] for c in fake_torchserve.calls] == [None]


def test_sampled_share(app, client, clinician, admin, patient, fake_torchserve, monkeypatch):
    client.put(SHADOW, headers=admin, json={"version": "2.0", "sample_rate": 0.5})
    draws = iter([0.7, 0.2])  # the first photograph is not sampled, the second is
    monkeypatch.setattr(random, "random", lambda: next(draws))
    upload(client, clinician, patient["id"], image_bytes())
    upload(client, clinician, patient["id"], image_bytes(color=(40, 120, 20)))
    drain(app)
    assert [c["version"] for c in fake_torchserve.calls] == [None, None, "2.0"]


class BlockingClient:
    """predict() waits until released, so the queue can be filled."""

    model_name = "dr"

    def __init__(self, fail=False):
        self.release = threading.Event()
        self.fail = fail
        self.calls = 0

    def predict(self, image, content_type, version=None):
        self.calls += 1
        self.release.wait(10)
        if self.fail:
            raise TorchServeUnavailable("down")
        return {"gradable": True, "grade": 2, "referable": True, "quality": {}, "model": {"version": version}}

    def metadata(self, version):
        return {}


def test_a_full_queue_drops_and_counts_and_never_blocks(app, client, clinician, patient):
    with app.app_context():
        upload(client, clinician, patient["id"], image_bytes())
        grading = Grading.get()
        screening = grading.screening
        blocking = BlockingClient(fail=True)
        worker = shadow.Shadow(blocking, queue_size=1)
        worker._cached = (float("inf"), shadow.Active("dr", "2.0", 1.0))
        worker._cards_seen.add("1.0")
        full, error = (sample("clarity_shadow_gradings_total", outcome=o) for o in ("dropped_queue_full", "dropped_error"))
        assert worker.offer(screening, (b"x", "image/jpeg"), grading)  # taken by the thread, which blocks
        deadline = __import__("time").monotonic() + 5
        while blocking.calls == 0 and __import__("time").monotonic() < deadline:
            pass
        assert worker.offer(screening, (b"x", "image/jpeg"), grading)  # waits in the queue
        assert not worker.offer(screening, (b"x", "image/jpeg"), grading)  # full: dropped at once
        assert sample("clarity_shadow_gradings_total", outcome="dropped_queue_full") == full + 1
        blocking.release.set()
        worker.drain()
        assert sample("clarity_shadow_gradings_total", outcome="dropped_error") == error + 2
        assert blocking.calls == 2  # never retried
        assert ShadowGrading.select().count() == 0


def test_report_compares_the_candidate_with_the_clinical_gradings(app, client, clinician, admin, patient,
                                                                   fake_torchserve):
    client.put(SHADOW, headers=admin, json={"version": "2.0"})
    ids = []
    for grade_default, grade_candidate in ((0, 0), (1, 1), (1, 2), (3, 3)):
        fake_torchserve.grade, fake_torchserve.version_grades["2.0"] = grade_default, grade_candidate
        ids.append(upload(client, clinician, patient["id"], image_bytes(color=(40 + 40 * len(ids), 40, 20))).json["id"])
        drain(app)
    report = client.get(f"{SHADOW}/report", headers=admin, query_string={"version": "2.0"})
    assert report.status_code == 200, report.json
    body = report.json
    assert body["photographs"] == 4 and body["both_gradable"] == 4 and body["baseline_versions"] == ["1.0"]
    assert body["grade_agreement"] == 0.75 and body["referable_agreement"] == 0.75 and body["gradable_agreement"] == 1
    assert body["grade_kappa"] == pytest.approx(agreement.quadratic_kappa([0, 1, 1, 3], [0, 1, 2, 3]))
    assert body["confusion"]["matrix"][1][2] == 1 and body["confusion"]["matrix"][3][3] == 1
    assert [d["screening_id"] for d in body["referral_disagreements"]] == [ids[2]]
    assert set(body["referral_disagreements"][0]) == {"screening_id", "patient_id", "baseline_grade",
                                                      "candidate_grade", "baseline_referable", "candidate_referable"}
    assert "Ada" not in report.get_data(as_text=True) and "MRN" not in report.get_data(as_text=True)
    clinician_report = client.get(f"{SHADOW}/report", headers=clinician, query_string={"version": "2.0"})
    assert clinician_report.status_code == 403


def test_models_show_card_metrics_and_shadow_agreement(app, client, clinician, admin, patient, fake_torchserve):
    fake_torchserve.cards["2.0"] = {"images": 400, "quadratic_kappa": {"value": 0.91, "ci95": [0.9, 0.92]},
                                    "referable_sensitivity": {"value": 0.95, "ci95": [0.9, 0.99]},
                                    "counts": [160, 60, 80, 48, 52], "predicted_counts": [150, 70, 80, 50, 50]}
    client.put(SHADOW, headers=admin, json={"version": "2.0"})
    fake_torchserve.version_grades["2.0"] = 1
    upload(client, clinician, patient["id"], image_bytes())
    drain(app)
    body = client.get("/api/v1/models", headers=admin).json
    versions = {v["version"]: v for v in body["versions"]}
    assert body["default_version"] == "1.0" and body["shadow"] == {"version": "2.0", "sample_rate": 1.0}
    assert versions["1.0"]["card"] is None and versions["1.0"]["shadow"] is None
    assert versions["2.0"]["card"]["quadratic_kappa"] == 0.91 and versions["2.0"]["card"]["images"] == 400
    assert versions["2.0"]["shadow"]["photographs"] == 1 and versions["2.0"]["shadow"]["grade_agreement"] == 1
    assert versions["2.0"]["shadow"]["baseline_version"] == "1.0"
    assert sample("clarity_model_card_grade_share", version="2.0", grade="0") == pytest.approx(0.375)


def test_per_version_metrics(app, client, clinician, admin, patient, fake_torchserve):
    before = sample("clarity_model_gradings_total", version="2.0", grade="4")
    quality = sample("clarity_model_quality_score_count", version="1.0")
    client.put(SHADOW, headers=admin, json={"version": "2.0"})
    fake_torchserve.version_grades["2.0"] = 4
    upload(client, clinician, patient["id"], image_bytes())
    drain(app)
    assert sample("clarity_model_gradings_total", version="2.0", grade="4") == before + 1
    assert sample("clarity_model_quality_score_count", version="1.0") == quality + 1
    text = client.get("/metrics").get_data(as_text=True)
    assert 'clarity_model_gradings_total{grade="4",version="2.0"}' in text


@pytest.mark.parametrize("seed", range(5))
def test_quadratic_kappa_matches_sklearn(seed):
    sklearn = pytest.importorskip("sklearn.metrics")
    rng = random.Random(seed)
    a = [rng.randrange(5) for _ in range(200)]
    b = [min(4, max(0, x + rng.choice((-1, 0, 0, 1)))) for x in a]
    assert agreement.quadratic_kappa(a, b) == pytest.approx(sklearn.cohen_kappa_score(a, b, weights="quadratic"))
    assert agreement.quadratic_kappa([], []) is None and agreement.quadratic_kappa([2, 2], [2, 2]) is None


def test_cli_report(app, client, clinician, admin, patient, fake_torchserve):
    client.put(SHADOW, headers=admin, json={"version": "2.0"})
    fake_torchserve.version_grades["2.0"] = 2
    sid = upload(client, clinician, patient["id"], image_bytes()).json["id"]
    drain(app)
    runner = app.test_cli_runner()
    text = runner.invoke(args=["shadow", "report", "--version", "2.0"])
    assert text.exit_code == 0, text.output
    assert "1 photographs, 1 gradable by both" in text.output and f"screening {sid}" in text.output
    assert "referable agreement 0.000" in text.output
    as_json = runner.invoke(args=["shadow", "report", "--version", "2.0", "--json"])
    import json
    assert json.loads(as_json.output)["referral_disagreements_total"] == 1


def test_shadow_work_waits_for_clinical_calls_in_flight(monkeypatch, tmp_path):
    monkeypatch.setattr(shadow, "MARKER_DIR", None)
    shadow.use_marker_dir(str(tmp_path / "markers"))
    with shadow.clinical_call():
        assert (tmp_path / "markers" / str(__import__("os").getpid())).exists()
        assert not shadow.wait_quiet(0.05)
    assert not list((tmp_path / "markers").iterdir())
    assert shadow.wait_quiet(1)
    client = BlockingClient()
    client.release.set()
    worker = shadow.Shadow(client)
    monkeypatch.setattr(shadow, "QUIET_WAIT_SECONDS", 0.2)
    busy = sample("clarity_shadow_gradings_total", outcome="dropped_busy")
    with shadow.clinical_call():
        worker._grade("00000000-0000-4000-8000-000000000000", (b"x", "image/jpeg"), None,
                      shadow.Active("dr", "2.0", 1.0))
    assert client.calls == 0 and sample("clarity_shadow_gradings_total", outcome="dropped_busy") == busy + 1


def test_another_api_process_in_flight_holds_shadow_back(monkeypatch, tmp_path):
    import os
    import subprocess
    import sys

    monkeypatch.setattr(shadow, "MARKER_DIR", None)
    shadow.use_marker_dir(str(tmp_path))
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (tmp_path / str(other.pid)).touch()  # what that process's clinical_call would write
        assert not shadow.wait_quiet(0.3)
        (tmp_path / str(other.pid)).unlink()
        assert shadow.wait_quiet(1)
    finally:
        other.kill()
        other.wait()
    (tmp_path / str(other.pid)).touch()  # a marker left by a process that died mid-call
    assert shadow.wait_quiet(1) and not (tmp_path / str(other.pid)).exists()
    assert shadow.marker_dir_for("sqlite:///a.db") != shadow.marker_dir_for("sqlite:///b.db")


def test_grade_pending_offers_to_shadow_too(app, client, clinician, admin, patient, fake_torchserve):
    client.put(SHADOW, headers=admin, json={"version": "2.0"})
    fake_torchserve.mode = "down"
    assert upload(client, clinician, patient["id"], image_bytes()).status_code == 202
    fake_torchserve.mode = "grade"
    result = app.test_cli_runner().invoke(args=["grade-pending"])
    assert result.exit_code == 0, result.output
    with app.app_context():
        assert [r.model_version for r in ShadowGrading.select()] == ["2.0"]
        assert [g.model_version for g in Grading.select()] == ["1.0"]


def test_exams_report_and_fhir_never_show_the_shadow_version(app, client, clinician, admin, patient,
                                                             fake_torchserve):
    from tests.unit.test_exams_api import add, new_exam, read

    pid = patient["id"]
    fake_torchserve.version_grades["2.0"] = 4  # the candidate would refer
    assert client.put(SHADOW, headers=admin, json={"version": "2.0"}).status_code == 200
    exam = new_exam(client, clinician, pid)["id"]
    for eye, color in (("left", (120, 40, 20)), ("right", (40, 120, 20))):  # two photographs, no cache hit
        assert add(client, clinician, pid, exam, eye=eye, color=color).status_code == 201
    drain(app)
    with app.app_context():
        assert ShadowGrading.select().count() == 2
    body = read(client, clinician, pid, exam)
    assert body["outcome"] == "rescreen_12_months" and body["model"]["version"] == "1.0"
    assert {e["grade"] for e in body["eyes"].values()} == {1}
    fhir = client.get(f"/api/v1/patients/{pid}/exams/{exam}/fhir", headers=clinician)
    assert fhir.status_code == 200 and '"2.0"' not in fhir.get_data(as_text=True)


def test_a_clinical_request_counts_from_its_arrival(app, client, clinician, patient, monkeypatch):
    seen = []
    original = shadow._in_flight
    real_put = app.extensions["clarity"]["storage"].put

    def put(*args, **kwargs):  # storage runs before the prediction: the request already counts
        seen.append(shadow._in_flight)
        return real_put(*args, **kwargs)

    monkeypatch.setattr(app.extensions["clarity"]["storage"], "put", put)
    assert upload(client, clinician, patient["id"], image_bytes()).status_code == 201
    assert seen == [original + 1] and shadow._in_flight == original
