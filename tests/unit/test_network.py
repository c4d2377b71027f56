"""DRNet and Grad-CAM: every architecture builds offline, pretrained backbones load from local files."""
from __future__ import annotations

import importlib

import pytest
import torch
import torchvision
from ts.utils.util import list_classes_from_module

from handlers import gradcam
from handlers.network import ARCHS, DRNet


@pytest.fixture(autouse=True)
def no_downloads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("DRNet tried to download weights")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


def test_model_file_defines_exactly_one_class():
    # TorchServe's archiver/BaseHandler contract for the model file
    module = importlib.import_module("handlers.network")
    assert list_classes_from_module(module) == [DRNet]


@pytest.mark.parametrize("arch", ARCHS)
def test_every_arch_grades_five_classes_and_exposes_a_cam_layer(arch):
    torch.manual_seed(0)
    model = DRNet(arch=arch).eval()
    x = torch.randn(2, 3, 64, 64)
    seen = {}
    hook = model.cam_layer().register_forward_hook(lambda m, i, o: seen.setdefault("out", o))
    with torch.inference_mode():
        logits = model(x)
    hook.remove()
    assert logits.shape == (2, 5)
    assert seen["out"].dim() == 4 and seen["out"].shape[0] == 2  # a spatial map per image


def test_unknown_arch_is_refused():
    with pytest.raises(ValueError, match="unknown arch"):
        DRNet(arch="vgg16")


def test_pretrained_backbone_loads_from_torchvision_file_and_ignores_its_head(tmp_path):
    torch.manual_seed(1)
    imagenet = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18_imagenet.pth"
    torch.save(imagenet.state_dict(), path)
    model = DRNet(arch="resnet18", pretrained_path=str(path))
    assert torch.equal(model.backbone.layer4[1].conv2.weight, imagenet.layer4[1].conv2.weight)
    assert model.head[-1].out_features == 5


def test_pretrained_backbone_loads_from_a_drnet_state_dict(tmp_path):
    source = DRNet(arch="mobilenet_v3_small")
    path = tmp_path / "drnet.pt"
    torch.save({"state_dict": source.state_dict()}, path)
    model = DRNet(arch="mobilenet_v3_small", pretrained_path=str(path))
    assert torch.equal(model.backbone.features[0][0].weight, source.backbone.features[0][0].weight)
    assert not torch.equal(model.head[-1].weight, source.head[-1].weight)  # head ignored


def test_pretrained_file_of_another_arch_is_refused(tmp_path):
    path = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    with pytest.raises(ValueError, match="does not hold a efficientnet_b0 backbone"):
        DRNet(arch="efficientnet_b0", pretrained_path=str(path))


def test_grad_cam_maps_the_predicted_grade_without_touching_weights():
    torch.manual_seed(0)
    model = DRNet(arch="mobilenet_v3_small").eval().requires_grad_(False)
    x = torch.randn(3, 3, 96, 96)
    logits, maps, targets = gradcam.grad_cam(model, model.cam_layer(), x)
    with torch.inference_mode():
        expected = model(x)
    assert torch.allclose(logits, expected, atol=1e-5)
    assert torch.equal(targets, expected.argmax(1))
    assert maps.shape == (3, 3, 3)  # 96 px / 32
    assert maps.min() >= 0 and maps.max() <= 1
    assert all(p.grad is None for p in model.parameters())
