"""What every benchmark cell runs on: the input photographs, the model checkpoint and its archives.

The inputs are the real photographs in samples/ plus copies of one IDRiD photograph resized to
about 1, 3 and 9 MP, each as JPEG and PNG. They are generated once into a cache under var/bench/
and reused, so every run (and every cell of a run) sends the same bytes.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image

from handlers.checksum import sha256_file
from scripts.serving.processes import REPO
from scripts.serving.stack import DEMO_CHECKPOINT

SAMPLES = REPO / "samples"
CACHE = REPO / "var" / "bench"
RESIZE_SOURCE = "idrid_01.jpg"
RESIZED_MP = (1, 3, 9)
JPEG_QUALITY = 90
CONTENT_TYPES = {"JPEG": "image/jpeg", "PNG": "image/png"}
# The stand-in's shape follows the demo model's training runs (var/exp1): MobileNetV3-small at 192 px.
STANDIN_ARCH, STANDIN_INPUT = "mobilenet_v3_small", 192


@dataclass(frozen=True)
class BenchInput:
    name: str
    kind: str            # "photograph" (as shipped in samples/) or "resized"
    format: str          # JPEG or PNG
    width: int
    height: int
    bytes: int
    path: str

    @property
    def megapixels(self) -> float:
        return self.width * self.height / 1e6

    @property
    def content_type(self) -> str:
        return CONTENT_TYPES[self.format]

    def data(self) -> bytes:
        return Path(self.path).read_bytes()

    def to_dict(self) -> dict:
        return {**asdict(self), "megapixels": round(self.megapixels, 2),
                "path": str(Path(self.path).relative_to(REPO)) if Path(self.path).is_relative_to(REPO) else self.path}


def _describe(path: Path, kind: str) -> BenchInput:
    with Image.open(path) as img:
        return BenchInput(path.name, kind, img.format, img.width, img.height, path.stat().st_size, str(path))


def _resized(src: Image.Image, megapixels: float, fmt: str) -> bytes:
    scale = (megapixels * 1e6 / (src.width * src.height)) ** 0.5
    img = src.resize((round(src.width * scale), round(src.height * scale)), Image.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": JPEG_QUALITY} if fmt == "JPEG" else {}))
    return buf.getvalue()


def inputs(cache: Path = CACHE) -> list[BenchInput]:
    """The photographs in samples/ and the resized copies, generated into `cache`/inputs once."""
    out = [_describe(p, "photograph") for p in sorted(SAMPLES.glob("*.jpg"))]
    source = SAMPLES / RESIZE_SOURCE
    folder = Path(cache) / "inputs"
    folder.mkdir(parents=True, exist_ok=True)
    src = None
    for mp in RESIZED_MP:
        for fmt in ("JPEG", "PNG"):
            path = folder / f"{source.stem}_{mp}mp.{fmt.lower().replace('jpeg', 'jpg')}"
            if not path.exists():
                if src is None:
                    src = Image.open(source).convert("RGB")
                tmp = path.with_suffix(".tmp")
                tmp.write_bytes(_resized(src, mp, fmt))
                tmp.replace(path)
            out.append(_describe(path, "resized"))
    return out


def smoke_inputs(all_inputs: list[BenchInput]) -> list[BenchInput]:
    """A small set for --smoke: one real photograph, the 600 px one and the 1 MP copies."""
    stem = Path(RESIZE_SOURCE).stem
    wanted = {RESIZE_SOURCE, "right_normal_600.jpg", f"{stem}_1mp.jpg", f"{stem}_1mp.png"}
    return [i for i in all_inputs if i.name in wanted]


def checkpoint(cache: Path = CACHE) -> tuple[Path, dict]:
    """(path, description) of the model to benchmark: the demo checkpoint, or a stand-in of the
    same kind with random weights while the demo one does not exist. Speed does not depend on
    the weights' values, only on the architecture and input size."""
    if DEMO_CHECKPOINT.exists():
        path, standin = DEMO_CHECKPOINT, False
    else:
        path, standin = Path(cache) / "standin_checkpoint.pt", True
        if not path.exists():
            _write_standin(path)
    import torch

    ck = torch.load(path, map_location="cpu", weights_only=True)
    info = {"path": str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path),
            "sha256": sha256_file(path), "arch": ck["arch"],
            "input_size": ck["preprocess"]["input_size"], "standin": standin,
            "synthetic_training_data": bool(ck["dataset"].get("synthetic"))}
    return path, info


def _write_standin(path: Path) -> None:
    import torch

    from handlers import fundus, quality
    from handlers.network import DRNet
    from scripts.ml import archive

    torch.manual_seed(0)
    model = DRNet(arch=STANDIN_ARCH)
    cfg = fundus.PreprocessConfig(input_size=STANDIN_INPUT)
    # Freshly initialised batch-norm statistics make every output the same, and then "the answers
    # did not change" would prove nothing: estimate them from the sample photographs instead.
    batch = torch.stack([t for t in (fundus.prepare(p.read_bytes(), cfg).tensor for p in sorted(SAMPLES.glob("*.jpg")))
                         if t is not None])
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = None  # cumulative average over the calibration passes
    model.train()
    with torch.no_grad():
        for flip in (False, True):
            model(batch.flip(-1) if flip else batch)
    model.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({
        "format": archive.CHECKPOINT_FORMAT, "arch": STANDIN_ARCH, "num_classes": 5,
        "state_dict": model.state_dict(),
        "preprocess": cfg.to_dict(),
        "quality": quality.QualityThresholds().to_dict(),
        "grade_labels": ["No DR", "Mild NPDR", "Moderate NPDR", "Severe NPDR", "Proliferative DR"],
        "referable_threshold": 2,
        "dataset": {"name": "bench-standin", "format": "none", "fingerprint": "0" * 64, "synthetic": True,
                    "counts": {}},
        "metrics": {}, "history": [], "code_revision": "bench-standin",
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }, path)


@dataclass(frozen=True)
class ServeConfig:
    """One TorchServe model configuration: what goes into the archive's model-config.yaml,
    plus the torch threads each worker gets (DR_TORCH_THREADS)."""

    batch_size: int
    max_batch_delay_ms: int
    workers: int | None    # None: not pinned in the archive, so TorchServe starts one per CPU core
    torch_threads: int

    @property
    def tag(self) -> str:
        workers = self.workers or "cores"
        return f"b{self.batch_size}-d{self.max_batch_delay_ms}-w{workers}-t{self.torch_threads}"

    def to_dict(self) -> dict:
        return {**asdict(self), "tag": self.tag}


def code_fingerprint() -> str:
    """SHA-256 over what goes into an archive besides the weights: the handler modules and the
    archiver. A cached .mar built from older code would benchmark that older code."""
    from scripts.ml import archive

    h = hashlib.sha256()
    for path in sorted(archive.HANDLERS.glob("*.py")) + [Path(archive.__file__)]:
        h.update(path.name.encode() + b"\0" + sha256_file(path).encode())
    return h.hexdigest()


def archive_for(ck_path: Path, ck_sha256: str, cfg: ServeConfig, cache: Path = CACHE) -> Path:
    """The .mar for this checkpoint, code and configuration, built once into a store per checkpoint and code."""
    from scripts.ml.archive import archive, mar_path

    store = Path(cache) / "model_store" / f"{ck_sha256[:12]}-{code_fingerprint()[:12]}"
    path = mar_path(store, "dr", cfg.tag)
    if not path.exists():
        archive(ck_path, cfg.tag, name="dr", model_store=store, batch_size=cfg.batch_size,
                max_batch_delay=cfg.max_batch_delay_ms, workers=cfg.workers, response_timeout=120,
                torch_threads=cfg.torch_threads)
    return path


def write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    tmp.replace(path)
