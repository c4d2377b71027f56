"""Inference engines for the handler: eager PyTorch, or ONNX Runtime over the exported network.

An archive names its engine in model_meta.json (`engine`: {"name", "file", ...}); without one
the handler runs the eager network. ONNX Runtime ran EfficientNet-B0 at 384-512 px 2-3x faster
than eager PyTorch at one thread per worker on this project's CPUs (docs/benchmarks), with the
same grades. Grad-CAM needs gradients, so explanations always run on the eager network.

`onnx-int8` is the same graph quantized (static, QDQ, per channel) with activation ranges
calibrated on training crops; adopt it only where it agrees with fp32 (docs/benchmarks).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

# Inside a .mar every handler file is a top-level module: try that first (as dr_handler does).
try:
    from checksum import sha256_file
except ImportError:
    from handlers.checksum import sha256_file

ENGINES = ("eager", "onnx", "onnx-int8")
ONNX_FILE = "model.onnx"
OPSET = 17
INPUT, OUTPUT = "input", "logits"


class Eager:
    """The network itself, in inference mode."""
    name = "eager"

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.model(batch)


class OnnxRuntime:
    """An ONNX Runtime session with `threads` intra-op threads and no inter-op pool; on the CPU,
    or on CUDA device `gpu` (that needs the onnxruntime-gpu package instead of onnxruntime)."""

    def __init__(self, path: Path, threads: int, name: str = "onnx", gpu: int | None = None):
        import onnxruntime as ort  # only archives that ask for it need the package loaded
        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, int(threads))
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        providers = ["CPUExecutionProvider"]
        if gpu is not None:
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": int(gpu)}))
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        self.name = name

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        x = np.ascontiguousarray(batch.detach().cpu().numpy(), dtype=np.float32)
        return torch.from_numpy(self.session.run([OUTPUT], {INPUT: x})[0])


def load(meta: dict, model_dir: Path, model: torch.nn.Module, device: torch.device, threads: int):
    """The engine model_meta.json names. On a GPU, ONNX Runtime only where its CUDA provider
    is installed (onnxruntime-gpu), else the eager network."""
    spec = meta.get("engine") or {"name": "eager"}
    if spec["name"] == "eager":
        return Eager(model)
    if spec["name"] not in ENGINES:
        raise ValueError(f"unknown engine {spec['name']!r}; choose one of {', '.join(ENGINES)}")
    gpu = device.index if device.type == "cuda" else None
    if device.type == "cuda" and not _cuda_provider():
        return Eager(model)
    path = Path(model_dir) / spec["file"]
    if spec.get("sha256") and sha256_file(path) != spec["sha256"]:
        raise ValueError(f"{path.name} does not match the SHA-256 in model_meta.json")
    return OnnxRuntime(path, threads, spec["name"], gpu=gpu)


def _cuda_provider() -> bool:
    import onnxruntime as ort
    return "CUDAExecutionProvider" in ort.get_available_providers()


def export_onnx(model: torch.nn.Module, input_size: int, path: Path) -> Path:
    """Write the network as ONNX with a dynamic batch axis (TorchServe batches vary)."""
    model = model.eval()
    example = torch.zeros(1, 3, input_size, input_size)
    # The TorchScript exporter (deprecated in torch 2.9 but present in 2.14): 2.5 s for
    # EfficientNet-B0 where dynamo=True took 40 s here, for the same ONNX Runtime speed and
    # outputs. When it is removed, dynamo=True with dynamic_shapes is the replacement.
    torch.onnx.export(model, (example,), str(path), input_names=[INPUT], output_names=[OUTPUT],
                      dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}},
                      opset_version=OPSET, dynamo=False)
    return Path(path)


def quantize_int8(fp32_path: Path, out_path: Path, calibration: list[torch.Tensor]) -> Path:
    """Static int8 (QDQ, per-channel weights) with activation ranges from `calibration` batches."""
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(calibration)

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {INPUT: batch.numpy().astype(np.float32)}

    prepared = Path(out_path).with_suffix(".pre.onnx")
    quant_pre_process(str(fp32_path), str(prepared))
    quantize_static(str(prepared), str(out_path), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    prepared.unlink()
    return Path(out_path)
