"""Grad-CAM (Selvaraju et al. 2017) for DRNet, and a PNG overlay of the map on the fundus crop."""
from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image


def grad_cam(model: torch.nn.Module, layer: torch.nn.Module, x: torch.Tensor):
    """Forward `x` with gradients and return (logits, maps, targets).

    maps: float32 numpy [n, h, w] in [0, 1] at `layer`'s resolution, one per image, for that
    image's predicted grade (targets). Parameters need no gradient: only activations do, so the
    model's weights are never touched.
    """
    seen: dict[str, torch.Tensor] = {}

    def keep(_module, _inputs, output):
        seen["activation"] = output
        output.register_hook(lambda grad: seen.__setitem__("gradient", grad))

    hook = layer.register_forward_hook(keep)
    try:
        with torch.enable_grad():
            logits = model(x.detach().requires_grad_(True))
            targets = logits.argmax(dim=1)
            # Images in a batch don't interact (eval mode), so one backward serves all of them.
            logits.gather(1, targets[:, None]).sum().backward()
    finally:
        hook.remove()
    activation, gradient = seen["activation"].detach(), seen["gradient"]
    weights = gradient.mean(dim=(2, 3), keepdim=True)
    maps = torch.relu((weights * activation).sum(dim=1))
    maps = maps / maps.amax(dim=(1, 2), keepdim=True).clamp_min(1e-8)
    return logits.detach(), maps.float().cpu().numpy(), targets.cpu()


def _jet(values: np.ndarray) -> np.ndarray:
    """values in [0, 1] -> uint8 RGB with the classic 'jet' ramp (blue, cyan, yellow, red)."""
    v = values[..., None]
    rgb = np.clip(np.concatenate([1.5 - np.abs(4 * v - 3), 1.5 - np.abs(4 * v - 2),
                                  1.5 - np.abs(4 * v - 1)], axis=-1), 0, 1)
    return (rgb * 255).astype(np.uint8)


def overlay_png(display: Image.Image, cam: np.ndarray, alpha: float = 0.4) -> bytes:
    """The map resized onto the RGB crop the network saw, blended, as PNG bytes."""
    base = display.convert("RGB")
    small = Image.fromarray((np.clip(cam, 0, 1) * 255).astype(np.uint8), mode="L")
    heat = np.asarray(small.resize(base.size, Image.BILINEAR), dtype=np.float32) / 255
    blended = Image.blend(base, Image.fromarray(_jet(heat)), alpha)
    out = io.BytesIO()
    blended.save(out, format="PNG", optimize=False)
    return out.getvalue()
