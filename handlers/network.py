"""The DR grading network: a torchvision backbone with a small grade head.

TorchServe's archiver and BaseHandler expect exactly one class in the model file, so the
per-architecture facts live in a dict rather than in subclasses.
"""
from __future__ import annotations

import torch
import torchvision
from torch import nn

# arch -> (backbone attribute holding the ImageNet head, index of the Linear whose in_features
# is the pooled feature width or None when the attribute is that Linear, Grad-CAM layer name)
_ARCHS = {
    "efficientnet_b0": ("classifier", 1, "features"),
    "resnet18": ("fc", None, "layer4"),
    "resnet50": ("fc", None, "layer4"),
    "mobilenet_v3_small": ("classifier", 0, "features"),
    "mobilenet_v3_large": ("classifier", 0, "features"),
}
ARCHS = tuple(_ARCHS)


class DRNet(nn.Module):
    """Backbone by name + dropout + linear head over `num_classes` ICDR grades.

    `weights=None` always: nothing is downloaded. `pretrained_path` names a local file with a
    backbone state dict (torchvision's ImageNet file, or a DRNet state dict); its head is ignored.
    """

    def __init__(self, arch: str = "efficientnet_b0", num_classes: int = 5,
                 pretrained_path: str | None = None, dropout: float = 0.2):
        super().__init__()
        if arch not in _ARCHS:
            raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
        self.arch = arch
        head_attr, linear_idx, self._cam_layer_name = _ARCHS[arch]
        backbone = torchvision.models.get_model(arch, weights=None)
        old_head = getattr(backbone, head_attr)
        width = (old_head if linear_idx is None else old_head[linear_idx]).in_features
        setattr(backbone, head_attr, nn.Identity())
        self.backbone = backbone
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(width, num_classes))
        if pretrained_path:
            self._load_backbone(pretrained_path, head_attr)

    def _load_backbone(self, path: str, head_attr: str) -> None:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]  # a training checkpoint
        backbone_state = {}
        for key, value in state.items():
            key = key.removeprefix("backbone.")
            if key.startswith((f"{head_attr}.", "head.")):
                continue
            backbone_state[key] = value
        missing, unexpected = self.backbone.load_state_dict(backbone_state, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"{path} does not hold a {self.arch} backbone: "
                f"{len(missing)} missing keys (e.g. {missing[:3]}), "
                f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def cam_layer(self) -> nn.Module:
        """The last convolutional stage, whose activations and gradients Grad-CAM uses."""
        return getattr(self.backbone, self._cam_layer_name)
