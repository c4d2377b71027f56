"""Label CSV readers, the stratified split, the fingerprint and the training Dataset."""
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from handlers import fundus
from scripts.ml import datasets, synth


def _touch_images(folder: Path, names, ext=".png"):
    folder.mkdir(parents=True, exist_ok=True)
    for n in names:
        Image.new("RGB", (8, 8)).save(folder / f"{n}{ext}")


def test_reads_aptos(tmp_path):
    _touch_images(tmp_path / "train_images", ["a1", "b2"])
    (tmp_path / "train.csv").write_text("id_code,diagnosis\na1,0\nb2,4\n")
    data = datasets.load(tmp_path)
    assert data.format == "aptos" and not data.synthetic
    assert [(s.name, s.grade, s.path.name) for s in data.samples] == [("a1", 0, "a1.png"), ("b2", 4, "b2.png")]
    assert data.counts() == [1, 0, 0, 0, 1]


def test_reads_eyepacs_with_jpeg_files(tmp_path):
    _touch_images(tmp_path / "train", ["10_left", "10_right"], ext=".jpeg")
    (tmp_path / "trainLabels.csv").write_text("image,level\n10_left,0\n10_right,2\n")
    data = datasets.load(tmp_path)
    assert data.format == "eyepacs"
    assert {s.name: s.grade for s in data.samples} == {"10_left": 0, "10_right": 2}
    assert all(s.path.suffix == ".jpeg" for s in data.samples)


def test_reads_idrid_with_blank_rows_and_extra_columns(tmp_path):
    _touch_images(tmp_path / "1. Original Images" / "a. Training Set", ["IDRiD_001", "IDRiD_002"], ".jpg")
    csv_path = tmp_path / "labels" / "IDRiD_Disease Grading_Training Labels.csv"
    csv_path.parent.mkdir()
    csv_path.write_text("Image name,Retinopathy grade,Risk of macular edema ,,\n"
                        "IDRiD_001,3,2,,\nIDRiD_002,0,0,,\n,,,,\n")
    fmt, samples = datasets.read_labels(csv_path, tmp_path)
    assert fmt == "idrid"
    assert [(s.name, s.grade) for s in samples] == [("IDRiD_001", 3), ("IDRiD_002", 0)]


def test_names_with_an_extension_in_the_csv(tmp_path):
    _touch_images(tmp_path, ["x"], ".jpg")
    (tmp_path / "train.csv").write_text("id_code,diagnosis\nx.jpg,1\n")
    assert datasets.load(tmp_path).samples[0].name == "x"


@pytest.mark.parametrize("body, message", [
    ("name,grade\nx,1\n", "unrecognised label CSV header"),
    ("id_code,diagnosis\nx,7\n", "outside 0-4"),
    ("id_code,diagnosis\nx,severe\n", "not a number"),
    ("id_code,diagnosis\nx,1\nx,2\n", "listed twice"),
    ("id_code,diagnosis\nx,1\nmissing,2\n", "not found"),
])
def test_bad_label_files_say_what_is_wrong(tmp_path, body, message):
    _touch_images(tmp_path, ["x"])
    (tmp_path / "train.csv").write_text(body)
    with pytest.raises(ValueError, match=message):
        datasets.load(tmp_path)


def _samples(counts):
    return [datasets.Sample(f"g{g}_{i:03d}", Path(f"/nonexistent/g{g}_{i}.png"), g)
            for g, n in enumerate(counts) for i in range(n)]


def test_stratified_split_keeps_grade_proportions():
    counts = [200, 40, 100, 20, 40]
    samples = _samples(counts)
    parts = datasets.stratified_split(samples, {"val": 0.15, "test": 0.15}, seed=0)
    names = [s.name for p in parts.values() for s in p]
    assert sorted(names) == sorted(s.name for s in samples)  # a partition
    for part in ("val", "test"):
        got = Counter(s.grade for s in parts[part])
        assert [got[g] for g in range(5)] == [30, 6, 15, 3, 6]
    again = datasets.stratified_split(list(reversed(samples)), {"val": 0.15, "test": 0.15}, seed=0)
    assert [s.name for s in again["val"]] == [s.name for s in parts["val"]]
    other = datasets.stratified_split(samples, {"val": 0.15, "test": 0.15}, seed=1)
    assert {s.name for s in other["val"]} != {s.name for s in parts["val"]}


def test_fingerprint_follows_labels_and_files_not_order(tmp_path):
    _touch_images(tmp_path, ["a", "b"])
    s = [datasets.Sample("a", tmp_path / "a.png", 0), datasets.Sample("b", tmp_path / "b.png", 1)]
    fp = datasets.fingerprint(s)
    assert datasets.fingerprint(list(reversed(s))) == fp
    relabelled = [s[0], datasets.Sample("b", tmp_path / "b.png", 2)]
    assert datasets.fingerprint(relabelled) != fp
    Image.new("RGB", (16, 16)).save(tmp_path / "b.png")  # another file of another size
    assert datasets.fingerprint(s) != fp


@pytest.fixture(scope="module")
def synthetic_folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    synth.generate(out, n=6, seed=11, size=256, workers=1, progress=False)
    # one ungradable image: a uniform grey frame has no fundus in it
    Image.new("RGB", (256, 256), (90, 90, 90)).save(out / "train_images" / "blank.png")
    with open(out / "train.csv", "a") as f:
        f.write("blank,0\n")
    return out


def test_synthetic_folder_is_marked_synthetic(synthetic_folder):
    data = datasets.load(synthetic_folder)
    assert data.synthetic and data.format == "aptos" and len(data.samples) == 7
    assert data.describe()["synthetic"] is True


def test_dataset_preprocesses_exactly_like_serving(synthetic_folder):
    cfg = fundus.PreprocessConfig(input_size=96)
    data = datasets.load(synthetic_folder)
    ds = datasets.FundusDataset(data.samples, cfg, preload=True, workers=1)
    assert len(ds) == 6 and [s.name for s, _ in ds.rejected] == ["blank"]
    for i, sample in enumerate(ds.samples):
        x, grade = ds[i]
        served = fundus.prepare(sample.path.read_bytes(), cfg).tensor
        assert grade == sample.grade and x.shape == (3, 96, 96)
        assert torch.equal(x, served)


def test_augmentation_changes_the_image_but_not_its_frame(synthetic_folder):
    cfg = fundus.PreprocessConfig(input_size=96)
    data = datasets.load(synthetic_folder)
    plain = datasets.FundusDataset(data.samples[:2], cfg, preload=True, workers=1)
    torch.manual_seed(0)
    aug = datasets.FundusDataset(data.samples[:2], cfg, augment=datasets.Augment(), preload=False)
    x0, _ = plain[0]
    x1, _ = aug[0]
    assert x1.shape == x0.shape and x1.dtype == torch.float32
    assert not torch.equal(x0, x1)
    # outside the retina both are the neutral Ben Graham grey: the mask moved with the image
    grey = torch.tensor((128 / 255 - np.array(cfg.mean)) / np.array(cfg.std), dtype=torch.float32)
    assert torch.allclose(x1[:, 0, 0], grey, atol=1e-5)


def test_collate_drops_ungradable_images(synthetic_folder):
    cfg = fundus.PreprocessConfig(input_size=64)
    data = datasets.load(synthetic_folder)
    ds = datasets.FundusDataset(data.samples, cfg, preload=False)
    x, y = datasets.collate([ds[i] for i in range(len(ds))])
    assert x.shape == (6, 3, 64, 64) and len(y) == 6
