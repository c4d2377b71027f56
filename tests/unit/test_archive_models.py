"""scripts.ml.archive (builds .mar files) and the parts of scripts.serving.registry that need no TorchServe."""
from __future__ import annotations

import hashlib
import http.server
import json
import threading
import zipfile

import pytest
import torch
import yaml

from scripts.ml import archive
from scripts.serving import management, registry as models
from scripts.ml.tiny_model import make_checkpoint


def read_mar(path):
    with zipfile.ZipFile(path) as z:
        return {name: z.read(name) for name in z.namelist()}


def test_archive_holds_handler_modules_weights_meta_config_and_card(model_store):
    files = read_mar(model_store / "dr_1.0.mar")
    assert {"dr_handler.py", "network.py", "fundus.py", "gradcam.py", "checksum.py", "weights.pt", "model_meta.json",
            "model-config.yaml", "MODEL_CARD.md", "MAR-INF/MANIFEST.json"} <= set(files)
    assert "__init__.py" not in files
    manifest = json.loads(files["MAR-INF/MANIFEST.json"])["model"]
    assert (manifest["modelName"], manifest["modelVersion"]) == ("dr", "1.0")
    assert manifest["handler"] == "dr_handler.py" and manifest["serializedFile"] == "weights.pt"

    meta = json.loads(files["model_meta.json"])
    assert meta["name"] == "dr" and meta["version"] == "1.0" and meta["arch"] == "mobilenet_v3_small"
    assert meta["synthetic"] is True and "synthetic" in meta["disclaimer"]
    assert meta["grade_labels"][2] == "Moderate NPDR" and meta["referable_threshold"] == 2
    assert meta["preprocess"]["input_size"] == 128
    assert meta["weights_sha256"] == hashlib.sha256(files["weights.pt"]).hexdigest()

    config = yaml.safe_load(files["model-config.yaml"])
    assert config == {"minWorkers": 1, "maxWorkers": 1, "batchSize": 8, "maxBatchDelay": 100,
                      "responseTimeout": 60, "handler": {"torch_threads": 1}}

    card = files["MODEL_CARD.md"].decode()
    assert "Not for clinical use" in card and meta["weights_sha256"] in card
    assert (model_store / "dr_1.0.md").read_text() == card


def test_default_config_leaves_workers_to_torchserve(tmp_path, tiny_checkpoint):
    """Defaults: one single-threaded worker per core (TorchServe decides), 5 ms batch delay."""
    mar = archive.archive(tiny_checkpoint, "3.0", model_store=tmp_path)
    with zipfile.ZipFile(mar) as z:
        config = yaml.safe_load(z.read("model-config.yaml"))
    assert config == {"batchSize": 8, "maxBatchDelay": 5, "responseTimeout": 60,
                      "handler": {"torch_threads": 1}}


def test_weights_are_a_float32_state_dict(tmp_path, tiny_checkpoint):
    ck = torch.load(tiny_checkpoint, weights_only=True)
    ck["state_dict"] = {k: v.half() if v.is_floating_point() else v for k, v in ck["state_dict"].items()}
    half = tmp_path / "half.pt"
    torch.save(ck, half)
    mar = archive.archive(half, "0.1", model_store=tmp_path / "store", torch_threads=2)
    (tmp_path / "w.pt").write_bytes(read_mar(mar)["weights.pt"])
    state = torch.load(tmp_path / "w.pt", weights_only=True)
    assert isinstance(state, dict)
    assert {v.dtype for v in state.values() if v.is_floating_point()} == {torch.float32}
    assert yaml.safe_load(read_mar(mar)["model-config.yaml"])["handler"] == {"torch_threads": 2}


def test_archive_refuses_to_overwrite_a_version(model_store, tiny_checkpoint, capsys):
    before = (model_store / "dr_1.0.mar").read_bytes()
    with pytest.raises(archive.ArchiveError, match="already exists"):
        archive.archive(tiny_checkpoint, "1.0", model_store=model_store)
    code = archive.main(["--checkpoint", str(tiny_checkpoint), "--version", "1.0",
                         "--model-store", str(model_store)])
    assert code == 1 and "immutable" in capsys.readouterr().err
    assert (model_store / "dr_1.0.mar").read_bytes() == before
    assert not list(model_store.glob(".staging-*"))


def test_archive_cli_writes_the_named_version(tmp_path, tiny_checkpoint, capsys):
    store = tmp_path / "store"
    assert archive.main(["--checkpoint", str(tiny_checkpoint), "--version", "3.1-rc1",
                         "--model-store", str(store), "--batch-size", "4"]) == 1
    assert "no held-out metrics" in capsys.readouterr().err and not store.exists()
    assert archive.main(["--checkpoint", str(tiny_checkpoint), "--version", "3.1-rc1",
                         "--model-store", str(store), "--batch-size", "4", "--without-held-out-metrics"]) == 0
    assert capsys.readouterr().out.strip() == str(store / "dr_3.1-rc1.mar")
    assert "promote` refuses this version" in (store / "dr_3.1-rc1.md").read_text()


def test_archive_puts_held_out_metrics_in_meta_and_card(tmp_path, tiny_checkpoint):
    ck = torch.load(tiny_checkpoint, weights_only=True)
    ck["metrics"] = {"test": {"images": 40, "quadratic_kappa": {"value": 0.7, "ci95": [0.6, 0.8]},
                              "counts": [10, 10, 10, 5, 5], "predicted_counts": [12, 8, 10, 5, 5],
                              "referable_definition": "referable = predicted grade >= 2 (what serving answers)"}}
    measured = tmp_path / "measured.pt"
    torch.save(ck, measured)
    assert archive.main(["--checkpoint", str(measured), "--version", "2.0", "--model-store", str(tmp_path / "s")]) == 0
    meta = json.loads(read_mar(tmp_path / "s" / "dr_2.0.mar")["model_meta.json"])
    assert meta["held_out"]["quadratic_kappa"]["value"] == 0.7 and meta["held_out"]["predicted_counts"][0] == 12
    card = (tmp_path / "s" / "dr_2.0.md").read_text()
    assert "quadratic_kappa.value | 0.7000" in card and "predicted grade >= 2" in card


@pytest.mark.parametrize("version", ["", "../1.0", "1/0", "v 1"])
def test_archive_refuses_bad_versions(tmp_path, tiny_checkpoint, version):
    with pytest.raises(archive.ArchiveError, match="invalid version"):
        archive.archive(tiny_checkpoint, version, model_store=tmp_path)


def test_archive_refuses_what_is_not_a_checkpoint(tmp_path):
    bad = tmp_path / "bad.pt"
    torch.save({"state_dict": {}}, bad)
    with pytest.raises(archive.ArchiveError, match="checkpoint"):
        archive.archive(bad, "1.0", model_store=tmp_path / "store")
    real = make_checkpoint(tmp_path / "ck.pt")
    ck = torch.load(real, weights_only=True)
    del ck["dataset"]["synthetic"]
    torch.save(ck, bad)
    with pytest.raises(archive.ArchiveError, match="synthetic"):
        archive.archive(bad, "1.0", model_store=tmp_path / "store")
    assert not (tmp_path / "store" / "dr_1.0.mar").exists()


def test_non_synthetic_card_carries_no_synthetic_warning(tmp_path):
    ck = make_checkpoint(tmp_path / "real.pt", synthetic=False)
    mar = archive.archive(ck, "1.0", model_store=tmp_path / "store")
    meta = json.loads(read_mar(mar)["model_meta.json"])
    assert meta["synthetic"] is False and "synthetic" not in meta["disclaimer"]
    assert "not validated for clinical use" in meta["disclaimer"]


def test_archive_identity_reads_the_manifest(model_store):
    assert models.archive_identity("dr_2.0.mar", model_store) == ("dr", "2.0")
    assert models.archive_identity("elsewhere/other_1.5.mar", model_store) == ("other", "1.5")
    with pytest.raises(management.ManagementError, match="--name and --version"):
        models.archive_identity("weird.mar", model_store)


def test_history_is_kept_per_model(tmp_path):
    history = models.History(tmp_path / models.HISTORY_FILE)
    assert history.load() == {}
    history.save({"dr": {"default": "1.1", "previous": ["1.0"], "registered": ["1.0", "1.1"]}})
    assert json.loads((tmp_path / ".defaults.json").read_text())["dr"]["default"] == "1.1"
    (tmp_path / ".defaults.json").write_text('{"dr": ["0.9", "1.0"]}')  # the older format
    assert history.load() == {"dr": {"default": None, "previous": ["0.9", "1.0"], "registered": []}}


def test_serve_models_restores_the_default_first(tmp_path):
    history = models.History(tmp_path / models.HISTORY_FILE)
    assert history.serve_models("dr", tmp_path) == ""
    for v in ("1.0", "1.1", "1.2"):
        (tmp_path / f"dr_{v}.mar").write_bytes(b"x")
    history.save({"dr": {"default": "1.1", "previous": ["1.0"], "registered": ["1.0", "1.1", "1.2", "9.9"]}})
    assert history.serve_models("dr", tmp_path) == "dr=dr_1.1.mar,dr=dr_1.0.mar,dr=dr_1.2.mar"
    assert models.main(["--model-store", str(tmp_path), "serve-models", "dr"]) == 0


def test_an_archive_outside_the_store_is_copied_in(tmp_path, model_store, capsys):
    store = tmp_path / "store"
    outside = tmp_path / "elsewhere" / "dr_2.0.mar"
    outside.parent.mkdir()
    outside.write_bytes((model_store / "dr_2.0.mar").read_bytes())
    said = []
    assert models.into_store(str(outside), store, said.append) == (store / "dr_2.0.mar").resolve()
    assert (store / "dr_2.0.mar").read_bytes() == outside.read_bytes() and "copied" in said[0]
    assert models.into_store("dr_2.0.mar", store) == (store / "dr_2.0.mar").resolve()  # a name in the store
    assert models.into_store(str(outside), store) == (store / "dr_2.0.mar").resolve()  # same bytes: fine
    outside.write_bytes(b"other bytes")
    with pytest.raises(management.ManagementError, match="immutable"):
        models.into_store(str(outside), store)
    with pytest.raises(management.ManagementError, match=f"model store {store.resolve()}"):
        models.into_store("dr_7.0.mar", store)


def test_workers_come_from_the_archive_else_one_per_core(tmp_path, tiny_checkpoint, model_store):
    assert models.archive_workers(model_store / "dr_1.0.mar") == 1  # the fixtures archive with workers=1
    plain = archive.archive(tiny_checkpoint, "5.0", model_store=tmp_path)  # the archive defaults
    assert models.archive_workers(plain) is None
    assert models.default_workers() >= 1


def test_gate_refuses_without_card_metrics_and_below_thresholds():
    from scripts.serving import gate

    t = gate.Thresholds()
    assert not gate.check("1.1", {"held_out": None}, t, None, False).passed
    low = {"held_out": {"quadratic_kappa": {"value": 0.2}, "referable_sensitivity": {"value": 0.95}}}
    verdict = gate.check("1.1", low, t, None, False)
    assert verdict.failures == ["held-out quadratic_kappa 0.200 is below 0.600"]
    assert "shadow agreement not checked" in verdict.notes[0]
    good = {"held_out": {"quadratic_kappa": {"value": 0.9}, "referable_sensitivity": {"value": 0.95}}}
    assert gate.check("1.1", good, t, None, True).passed
    shadow = {"photographs": 50, "grade_kappa": 0.9, "referable_agreement": 0.7, "baseline_version": "1.0"}
    verdict = gate.check("1.1", good, t, shadow, True)
    assert verdict.failures == ["shadow referable_agreement with 1.0 is 0.700 over 50 photographs, below 0.900"]
    collapsed = {"held_out": {"quadratic_kappa": {"value": 0.0}, "referable_sensitivity": {"value": 0.0},
                              "predicted_counts": [40, 0, 0, 0, 0]}}
    verdict = gate.check("1.1", collapsed, t, None, True)
    assert not verdict.passed and "one and the same grade" in verdict.notes[0]
    assert gate.Thresholds.from_env({"PROMOTE_MIN_QWK": "0.3"}, min_shadow_kappa=0.1) == \
        gate.Thresholds(min_qwk=0.3, min_shadow_kappa=0.1)


class _Answer(http.server.BaseHTTPRequestHandler):
    status = 405

    def _reply(self):
        body = json.dumps({"code": self.status, "type": "MethodNotAllowed", "message": "Requested method is not allowed"})
        self.send_response(self.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())

    do_GET = do_POST = do_PUT = do_DELETE = _reply

    def log_message(self, *args):
        pass


@pytest.fixture
def stub_management():
    """A stand-in management API that answers every call with one status (unit tests only)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Answer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_405_means_the_model_api_is_off(stub_management, tmp_path, capsys):
    (tmp_path / "dr_1.0.mar").write_bytes(b"not read: name and version are given")
    code = models.main(["--management", stub_management, "--model-store", str(tmp_path),
                        "register", "dr_1.0.mar", "--name", "dr", "--version", "1.0"])
    assert code == 1
    assert "model API disabled: set enable_model_api=true" in capsys.readouterr().err


def test_unreachable_management_api_is_reported(monkeypatch):
    from tenacity import wait_none

    from scripts.serving.processes import free_port

    monkeypatch.setattr(management.Management._send.retry, "wait", wait_none())  # retries, no back-off
    api = management.Management(f"http://127.0.0.1:{free_port()}")
    with pytest.raises(management.ManagementError, match="not reachable"):
        models.default_version(api, "dr")
