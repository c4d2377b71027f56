"""In-process measurements: the limit every server is compared with, and the cost of each step.

- the limit: fundus.prepare plus the eager forward pass, with no HTTP, no queue and no copy, at
  batch 1 and 8; in one process, and in one process per core started together;
- preprocessing split into its steps through fundus.py's public functions;
- JPEG draft-mode decoding against a full decode (same pipeline, draft switched off);
- forward pass alone: threads, and TorchScript (traced, frozen) against eager;
- the API's own work per upload (image check, SHA-256, local storage write), outside any server.
"""
from __future__ import annotations

import contextlib
import io
import multiprocessing as mp
import statistics
import time
import warnings
from pathlib import Path

import torch
from PIL import Image, JpegImagePlugin
from tqdm import tqdm

from handlers import fundus, quality
from handlers.network import DRNet
from bench.driver import stats


def load_model(ck_path: Path, threads: int | None = None):
    """(model, PreprocessConfig, QualityThresholds) from a checkpoint, eval mode, no grad."""
    if threads:
        torch.set_num_threads(threads)
    ck = torch.load(ck_path, map_location="cpu", weights_only=True)
    model = DRNet(arch=ck["arch"], num_classes=len(ck["grade_labels"]))
    model.load_state_dict(ck["state_dict"])
    model.eval().requires_grad_(False)
    return model, fundus.PreprocessConfig.from_dict(ck["preprocess"]), \
        fundus.QualityThresholds.from_dict(ck["quality"])


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


def _run_batches(datas: list[bytes], order: list[int], model, cfg, thresholds, batch: int):
    """Preprocess and grade `order` (indices into datas) in batches; (seconds per batch, images)."""
    spans = []
    for start in range(0, len(order), batch):
        t = time.perf_counter()
        tensors = []
        for i in order[start:start + batch]:
            prepared = fundus.prepare(datas[i], cfg, thresholds)
            if prepared.tensor is not None:
                tensors.append(prepared.tensor)
        if tensors:
            with torch.inference_mode():
                torch.softmax(model(torch.stack(tensors)), 1).tolist()
        spans.append(time.perf_counter() - t)
    return spans


def limit_in_process(inputs, model, cfg, thresholds, batch: int, n: int) -> dict:
    """Throughput of prepare + forward in this process, round-robin over the inputs like the load cells."""
    datas = [i.data() for i in inputs]
    _run_batches(datas, list(range(min(len(datas), batch))), model, cfg, thresholds, batch)  # warm-up
    order = [i % len(datas) for i in range(n)]
    started = time.perf_counter()
    spans = _run_batches(datas, order, model, cfg, thresholds, batch)
    wall = time.perf_counter() - started
    # Every image of a batch is answered when the batch is: its latency is the batch's time.
    per_request = [s for s in spans for _ in range(batch)][:n]
    return {"batch": batch, "processes": 1, "torch_threads": torch.get_num_threads(), "requests": n,
            "wall_s": round(wall, 3), "throughput_rps": round(n / wall, 3), **stats(per_request)}


def _child(ck_path, paths, batch, order, barrier, queue):
    torch.set_num_threads(1)
    model, cfg, thresholds = load_model(ck_path)
    datas = [Path(p).read_bytes() for p in paths]
    _run_batches(datas, order[:batch], model, cfg, thresholds, batch)
    barrier.wait()
    started = time.perf_counter()
    spans = _run_batches(datas, order, model, cfg, thresholds, batch)
    queue.put((started, time.perf_counter(), len(order), spans, time.time() - time.perf_counter()))


def limit_parallel(ck_path: Path, inputs, batch: int, n: int, processes: int) -> dict:
    """One process per core, one torch thread each, started together on disjoint shares of the
    same round-robin request sequence: the most this machine does without any server."""
    ctx = mp.get_context("spawn")  # no fork after torch has started its thread pools
    barrier, queue = ctx.Barrier(processes), ctx.Queue()
    order = [i % len(inputs) for i in range(n)]
    shares = [order[k::processes] for k in range(processes)]
    procs = [ctx.Process(target=_child, args=(ck_path, [i.path for i in inputs], batch, share, barrier, queue))
             for share in shares]
    for p in procs:
        p.start()
    results = [queue.get(timeout=600) for _ in procs]
    for p in procs:
        p.join(30)
    # perf_counter is per process: put every span on the wall clock through each child's offset.
    starts = [s + off for s, _, _, _, off in results]
    ends = [e + off for _, e, _, _, off in results]
    wall = max(ends) - min(starts)
    per_request = [s for *_, spans, _ in results for s in spans for _ in range(batch)]
    return {"batch": batch, "processes": processes, "torch_threads": 1, "requests": n,
            "wall_s": round(wall, 3), "throughput_rps": round(n / wall, 3), **stats(per_request)}


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
