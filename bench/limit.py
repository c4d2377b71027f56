"""In-process measurements: the limit every server is compared with, and the cost of each step.

- the limit: decode + fundus.prepare + the forward pass (eager and ONNX Runtime), with no HTTP and
  no queue, at batch 1 and 8, one single-threaded process per core started together;
- preprocessing split into its steps through fundus.py's public functions;
- JPEG draft-mode decoding against a full decode (same pipeline, draft switched off);
- forward pass alone: threads, and TorchScript (traced, frozen) against eager;
- the API's own work per upload (image check, SHA-256, local storage write), outside any server.
"""
from __future__ import annotations

import contextlib
import io
import multiprocessing as mp
import os
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
from PIL import Image, JpegImagePlugin
from tqdm import tqdm

from handlers import fundus, quality
from handlers.network import DRNet


def load_model(ck_path: Path, threads: int | None = None):
    """(model, PreprocessConfig, QualityThresholds) from a checkpoint, eval mode, no grad."""
    if threads:
        torch.set_num_threads(threads)
    ck = torch.load(ck_path, map_location="cpu", weights_only=True)
    model = DRNet(arch=ck["arch"], num_classes=len(ck["grade_labels"]))
    model.load_state_dict(ck["state_dict"])
    model.eval().requires_grad_(False)
    return model, fundus.PreprocessConfig.from_dict(ck["preprocess"]), \
        quality.QualityThresholds.from_dict(ck["quality"])


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


def _median_time(fn, repeats: int):
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


@contextlib.contextmanager
def no_jpeg_draft():
    """fundus.decode with JPEG draft mode switched off: a full decode, then the same box reduction."""
    original = JpegImagePlugin.JpegImageFile.draft
    JpegImagePlugin.JpegImageFile.draft = lambda self, mode, size: None
    try:
        yield
    finally:
        JpegImagePlugin.JpegImageFile.draft = original


def full_decode_resize(data: bytes, size: int) -> Image.Image:
    """The reference: decode every pixel, then resize the whole photograph to the model input."""
    img = Image.open(io.BytesIO(data))
    img.load()
    return img.convert("RGB").resize((size, size), Image.BILINEAR)


def preprocess_split(inputs, cfg, thresholds, repeats: int) -> list[dict]:
    """Median milliseconds of each preprocessing step, per input.

    Steps, as fundus.prepare chains them: decode (draft-mode JPEG + reduction) -> disc (find_disc)
    -> crop (crop_disc to the input size) -> quality (assess_quality) -> normalise
    (preprocess_image: retina mask, Ben Graham, normalisation). `prepare` is the one call the handler
    makes; `prepare_no_draft` the same with a full JPEG decode; `full_decode` and
    `full_decode_resize` the reference the target compares with."""
    min_side = max(cfg.input_size, quality.ANALYSIS_SIZE)
    rows = []
    for inp in tqdm(inputs, desc="preprocessing split", leave=False):
        data = inp.data()
        row = {"input": inp.name, "format": inp.format, "megapixels": round(inp.megapixels, 2)}
        t, img = _median_time(lambda: fundus.decode(data, min_side=min_side), repeats)
        row["decode"] = _ms(t)
        row["decoded_size"] = list(img.size)
        t, disc = _median_time(lambda: fundus.find_disc(img), repeats)
        row["disc"] = _ms(t)
        if disc is not None:
            t, crop = _median_time(lambda: fundus.crop_disc(img, disc, cfg.input_size), repeats)
            row["crop"] = _ms(t)
            shared = crop if cfg.input_size == quality.ANALYSIS_SIZE else None
            t, verdict = _median_time(lambda: fundus.assess_quality(img, disc, thresholds, crop=shared), repeats)
            row["quality"] = _ms(t)
            row["gradable"] = bool(verdict["gradable"])
            t, _ = _median_time(lambda: fundus.preprocess_image(img, disc, cfg, crop=crop), repeats)
            row["normalise"] = _ms(t)
        t, _ = _median_time(lambda: fundus.prepare(data, cfg, thresholds), repeats)
        row["prepare"] = _ms(t)
        with no_jpeg_draft():
            t, _ = _median_time(lambda: fundus.decode(data, min_side=min_side), repeats)
            row["decode_no_draft"] = _ms(t)
            t, _ = _median_time(lambda: fundus.prepare(data, cfg, thresholds), repeats)
            row["prepare_no_draft"] = _ms(t)
        t, _ = _median_time(lambda: Image.open(io.BytesIO(data)).load(), repeats)
        row["full_decode"] = _ms(t)
        t, _ = _median_time(lambda: full_decode_resize(data, cfg.input_size), repeats)
        row["full_decode_resize"] = _ms(t)
        rows.append(row)
    return rows


def draft_agreement(inputs, model, cfg, thresholds) -> dict:
    """How far draft-mode decoding moves the answers: grades and probabilities with and without."""
    diffs, same_grade, same_verdict, n = [], 0, 0, 0
    for inp in inputs:
        data = inp.data()
        a = fundus.prepare(data, cfg, thresholds)
        with no_jpeg_draft():
            b = fundus.prepare(data, cfg, thresholds)
        n += 1
        same_verdict += a.quality["gradable"] == b.quality["gradable"]
        if a.tensor is None or b.tensor is None:
            continue
        with torch.inference_mode():
            pa, pb = (torch.softmax(model(p.tensor[None]), 1)[0] for p in (a, b))
        diffs.append(float((pa - pb).abs().max()))
        same_grade += int(pa.argmax()) == int(pb.argmax())
    return {"inputs": n, "same_quality_verdict": same_verdict, "graded_both": len(diffs),
            "same_grade": same_grade, "max_abs_probability_difference": round(max(diffs, default=0.0), 5)}


def _limit_child(ck_path, engine, batch, paths, seconds, barrier, queue):
    from handlers import engine as engines

    model, cfg, thresholds = load_model(ck_path, threads=1)
    run, tmp = engines.Eager(model), Path(tempfile.mkdtemp(prefix="limit-"))
    if engine == "onnx":
        run = engines.OnnxRuntime(engines.export_onnx(model, cfg.input_size, tmp / "m.onnx"), 1)
    datas = [Path(p).read_bytes() for p in paths]

    def one_batch(k):
        tensors = [t for t in (fundus.prepare(datas[(k + j) % len(datas)], cfg, thresholds).tensor
                               for j in range(batch)) if t is not None]
        if tensors:
            run(torch.stack(tensors))

    one_batch(0)  # warm-up
    barrier.wait()  # every process measures over the same span, so the sum is what the cores do
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        one_batch(done)
        done += batch
    queue.put((done, time.perf_counter() - start))
    shutil.rmtree(tmp, ignore_errors=True)


def limit(ck_path: Path, inputs, seconds: float, engines=("eager", "onnx"), batches=(1, 8)) -> list[dict]:
    """The limit: decode + fundus.prepare + forward pass of `inputs` (round robin), no HTTP, no
    queue, one single-threaded process per core started together, for each engine and batch size.
    The best row is the most this machine does without any server."""
    ctx = mp.get_context("spawn")  # no fork after torch has started its thread pools
    procs, rows = os.cpu_count() or 1, []
    for engine in engines:
        for batch in batches:
            barrier, queue = ctx.Barrier(procs), ctx.Queue()
            children = [ctx.Process(target=_limit_child, args=(ck_path, engine, batch, [i.path for i in inputs],
                                                                seconds, barrier, queue)) for _ in range(procs)]
            for c in children:
                c.start()
            results = [queue.get(timeout=600) for _ in children]
            for c in children:
                c.join(30)
            rows.append({"engine": engine, "batch": batch, "processes": procs, "threads_each": 1,
                         "seconds": seconds, "images_per_s": round(sum(d / s for d, s in results), 2),
                         "load_average_1m": round(os.getloadavg()[0], 2)})
            tqdm.write(f"  limit {engine} batch {batch}, {procs} processes: {rows[-1]['images_per_s']} img/s")
    return rows


def forward_variants(model, cfg, repeats: int, thread_counts=(1, 2)) -> list[dict]:
    """Forward pass alone: eager vs TorchScript (trace + freeze + optimize_for_inference), by
    threads and batch; with the largest difference of the TorchScript outputs from eager."""
    rows = []
    before = torch.get_num_threads()
    size = cfg.input_size
    for threads in thread_counts:
        torch.set_num_threads(threads)
        for batch in (1, 8):
            x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))
            with torch.inference_mode():
                eager_out = model(x)
                t_eager, _ = _median_time(lambda: model(x), repeats)
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated in favour of torch.compile
                scripted = torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(model, x).eval()))
                for _ in range(3):  # the profiling executor specialises over the first calls
                    scripted(x)
                t_script, script_out = _median_time(lambda: scripted(x), repeats)
            rows.append({"threads": threads, "batch": batch, "eager_ms": _ms(t_eager),
                         "torchscript_ms": _ms(t_script),
                         "torchscript_max_abs_logit_diff": float((script_out - eager_out).abs().max())})
    torch.set_num_threads(before)
    return rows


def api_hops(inputs, workdir: Path, repeats: int) -> list[dict]:
    """Median ms of the API's own per-upload work on each input, called in-process: the image check
    (control_api.images.inspect, the header only), the SHA-256, and a local-storage write (temp file,
    fsync, rename). `decode_check` is the check it replaced: the header, then a decode of the pixels
    (`images.verify_decodable`, which the API now runs only when TorchServe cannot answer)."""
    import hashlib

    from control_api import images
    from control_api.storage import LocalStorage, sha256_hex

    storage = LocalStorage(workdir)
    rows = []
    for inp in inputs:
        data = inp.data()
        digest = sha256_hex(data)
        row = {"input": inp.name, "format": inp.format, "megapixels": round(inp.megapixels, 2),
               "bytes": inp.bytes}
        row["inspect"] = _ms(_median_time(lambda: images.inspect(data), repeats)[0])
        row["decode_check"] = _ms(_median_time(
            lambda: images.verify_decodable(data, images.inspect(data)), repeats)[0])
        row["sha256"] = _ms(_median_time(lambda: hashlib.sha256(data).hexdigest(), repeats)[0])
        row["local_put"] = _ms(_median_time(
            lambda: storage.put("screenings/bench", data, content_type=inp.content_type, sha256=digest), repeats)[0])
        rows.append(row)
    storage.delete("screenings/bench")
    return rows
