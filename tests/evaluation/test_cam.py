"""Grad-CAM: the map points at the object, and `effnet cam` draws models side by side."""

from __future__ import annotations

import numpy as np
import torch
from eval_helpers import assert_png_not_blank
from PIL import Image
from skimage import data
from torchvision.transforms.v2 import functional as F

import effnet
from effnet.cli import main
from effnet.evaluation.cam import grad_cam
from effnet.models.checkpoint import save_model
from effnet.trained import imagenet_class_names


def test_grad_cam_points_at_the_cat() -> None:
    model = effnet.create_model("efficientnet_lite0", pretrained=True).eval()
    cat = torch.from_numpy(np.ascontiguousarray(data.chelsea()[:, 50:350])).permute(2, 0, 1)  # 300x300
    canvas = torch.full((3, 300, 600), 128, dtype=torch.uint8)
    canvas[:, :, :300] = cat  # the cat on the left, flat grey on the right
    image = F.resize(canvas, [224, 448], antialias=True).float() / 255
    batch = F.normalize(image, model.pretrained_cfg["mean"], model.pretrained_cfg["std"]).unsqueeze(0)
    cams, classes, probabilities = grad_cam(model, batch)
    assert cams.shape == (1, 224, 448)
    assert cams.min() >= 0 and cams.max() == np.float32(1.0)
    assert "cat" in imagenet_class_names()[classes[0]] and 0 < probabilities[0] <= 1
    assert cams[0, :, :224].mean() > 2 * cams[0, :, 224:].mean()


def test_cam_cli_compares_models_side_by_side(tmp_path) -> None:
    image = tmp_path / "chelsea.png"
    Image.fromarray(data.chelsea()).save(image)
    bigger = tmp_path / "lite0_260.pt"
    save_model(bigger, effnet.create_model("efficientnet_lite0", pretrained=True, img_size=260), imagenet_class_names())
    output = tmp_path / "cam.png"
    assert main(["cam", "efficientnet_lite0", str(image), "--compare", str(bigger), "--output", str(output)]) == 0
    pixels = assert_png_not_blank(output)
    assert pixels.shape[1] > 2.5 * pixels.shape[0]  # one row: the image and two maps
