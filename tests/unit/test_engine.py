"""The ONNX Runtime engine: export, parity with eager PyTorch, selection from model_meta.json,
and the archive option that ships it. A tiny random network: these check the plumbing, not speed."""
from __future__ import annotations

import json
import zipfile

import pytest
import torch

from handlers import dr_handler
from handlers import engine as engines
from handlers.checksum import sha256_file
from handlers.network import DRNet
from scripts.ml import archive
from tests.unit.test_handler import make_context

SIZE = 96


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    model = DRNet(arch="mobilenet_v3_small").eval()
    path = engines.export_onnx(model, SIZE, tmp_path_factory.mktemp("onnx") / engines.ONNX_FILE)
    return model, path


@pytest.mark.parametrize("batch", [1, 3, 8])
def test_onnx_matches_eager_at_any_batch(tiny, batch):
    model, path = tiny
    x = torch.randn(batch, 3, SIZE, SIZE)
    eager = engines.Eager(model)(x)
    onnx = engines.OnnxRuntime(path, threads=1)(x)
    assert onnx.shape == eager.shape == (batch, 5)
    assert torch.allclose(torch.softmax(onnx, 1), torch.softmax(eager, 1), atol=1e-5)
    assert torch.equal(onnx.argmax(1), eager.argmax(1))


def test_meta_selects_the_engine_and_checks_its_hash(tiny, tmp_path):
    model, path = tiny
    cpu = torch.device("cpu")
    assert engines.load({}, tmp_path, model, cpu, 1).name == "eager"
    spec = {"name": "onnx", "file": path.name, "sha256": sha256_file(path)}
    assert engines.load({"engine": spec}, path.parent, model, cpu, 1).name == "onnx"
    # Without onnxruntime-gpu (this machine), a GPU worker keeps the eager network.
    assert engines.load({"engine": spec}, path.parent, model, torch.device("cuda:0"), 1).name == "eager"
    with pytest.raises(ValueError, match="SHA-256"):
        engines.load({"engine": {**spec, "sha256": "0" * 64}}, path.parent, model, cpu, 1)
    with pytest.raises(ValueError, match="unknown engine"):
        engines.load({"engine": {**spec, "name": "tensorrt"}}, path.parent, model, cpu, 1)


def test_int8_quantization_runs_and_keeps_the_output_shape(tiny, tmp_path):
    model, path = tiny
    calibration = [torch.randn(4, 3, SIZE, SIZE) for _ in range(2)]
    int8 = engines.quantize_int8(path, tmp_path / "int8.onnx", calibration)
    out = engines.OnnxRuntime(int8, threads=1, name="onnx-int8")(torch.randn(2, 3, SIZE, SIZE))
    assert out.shape == (2, 5) and torch.isfinite(out).all()
    assert not (tmp_path / "int8.pre.onnx").exists()


def test_archive_with_onnx_engine_grades_like_eager(tiny_checkpoint, tmp_path, sample_paths):
    """Two archives of one checkpoint: the handler of each gives the same grades, and the ONNX
    one still explains with Grad-CAM (on the eager network)."""
    handlers = {}
    for engine in ("eager", "onnx"):
        mar = archive.archive(tiny_checkpoint, engine, model_store=tmp_path / "store", engine=engine)
        out = tmp_path / engine
        with zipfile.ZipFile(mar) as z:
            z.extractall(out)
        meta = json.loads((out / "model_meta.json").read_text())
        assert ("engine" in meta) == (engine == "onnx")
        h = dr_handler.DRHandler()
        h.initialize(make_context(out))
        assert h.engine.name == engine
        handlers[engine] = (h, out)
    rows = [{"data": p.read_bytes()} for p in sample_paths[:3]]
    answers = {}
    for engine, (h, out) in handlers.items():
        ctx = make_context(out, [{} for _ in rows] + [{"explain": "True"}])
        answers[engine] = h.handle(rows + rows[:1], ctx)
    for eager, onnx in zip(answers["eager"], answers["onnx"]):
        assert onnx["grade"] == eager["grade"]
        assert max(abs(a - b) for a, b in zip(onnx["probabilities"], eager["probabilities"])) <= 1e-4
    assert answers["onnx"][-1]["explanation"]["method"] == "grad-cam"


def test_archive_refuses_int8_without_calibration_images(tiny_checkpoint, tmp_path):
    with pytest.raises(archive.ArchiveError, match="calibration"):
        archive.archive(tiny_checkpoint, "q", model_store=tmp_path, engine="onnx-int8")
    assert not list(tmp_path.glob("*.mar"))


def test_archive_int8_calibrates_on_a_folder_of_photographs(tiny_checkpoint, tmp_path):
    """The int8 path end to end: calibration crops come from real image files through the
    handler's preprocessing and quality gate (an ungradable file is skipped, not fatal)."""
    from tests.support.images import blank_frame, encode, fundus_like
    photos = tmp_path / "train"
    photos.mkdir()
    for seed in range(3):
        (photos / f"f{seed}.jpg").write_bytes(encode(fundus_like(seed=seed)))
    (photos / "blank.png").write_bytes(encode(blank_frame(), "PNG"))
    mar = archive.archive(tiny_checkpoint, "q", model_store=tmp_path / "store", engine="onnx-int8",
                          calibration_dir=photos)
    with zipfile.ZipFile(mar) as z:
        meta = json.loads(z.read("model_meta.json"))
    assert meta["engine"]["name"] == "onnx-int8"
