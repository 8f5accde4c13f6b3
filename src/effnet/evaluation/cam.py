"""Grad-CAM (Selvaraju et al. 2017) on EfficientNet's last stage, and the side-by-side figure of the
paper's Figure 7, where models of different scale look at the same images.

The map is the ReLU of the last stage's activations weighted by the spatially averaged gradient of the
chosen class score: where the evidence for that class is. The last MBConv stage (stride 32) is used,
not the 1x1 head conv after it, following the paper's figure; both have the same resolution.
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from effnet.data import build_transforms  # noqa: E402
from effnet.trained import Trained  # noqa: E402


def grad_cam(
    model: torch.nn.Module, images: torch.Tensor, classes: Sequence[int] | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Class activation maps (N, H, W) in [0, 1] at the input resolution, for `classes` (default: the
    predicted class of each image); also returns the classes and their probabilities."""
    model.eval()
    stage = model.stages[-1]
    captured: dict[str, torch.Tensor] = {}

    def keep(_module: torch.nn.Module, _inputs: object, output: torch.Tensor) -> None:
        output.retain_grad()
        captured["maps"] = output

    hook = stage.register_forward_hook(keep)
    try:
        with torch.enable_grad():
            images = images.detach().requires_grad_(True)  # gradients flow even if the weights are frozen
            logits = model(images)
            chosen = logits.argmax(1) if classes is None else torch.as_tensor(list(classes))
            logits.gather(1, chosen[:, None]).sum().backward()
    finally:
        hook.remove()
    maps, grads = captured["maps"].detach(), captured["maps"].grad.detach()
    weights = grads.mean(dim=(2, 3), keepdim=True)
    cams = F.relu((weights * maps).sum(1, keepdim=True))
    cams = F.interpolate(cams, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    peak = cams.flatten(1).max(1).values.clamp_min(1e-12)
    cams = cams / peak[:, None, None]
    probabilities = logits.detach().softmax(1).gather(1, chosen[:, None])[:, 0]
    return cams.numpy(), chosen.numpy(), probabilities.numpy()


def _display(images: torch.Tensor, preprocess: dict) -> np.ndarray:
    """Undo the normalisation: (N, 3, H, W) model inputs back to (N, H, W, 3) floats in [0, 1]."""
    mean = torch.tensor(preprocess["mean"])[None, :, None, None]
    std = torch.tensor(preprocess["std"])[None, :, None, None]
    return (images * std + mean).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def cam_figure(models: Sequence[Trained], images: Sequence[torch.Tensor], titles: Sequence[str]) -> Figure:
    """Rows: images (uint8 CHW); columns: the image, then each model's Grad-CAM overlaid on the image
    as that model sees it (its own resolution and crop), captioned with its prediction."""
    columns = 1 + len(models)
    figure, axes = plt.subplots(len(images), columns, figsize=(3 * columns, 3.1 * len(images)), squeeze=False)
    for col, trained in enumerate(models, start=1):
        transform = build_transforms(trained.preprocess, train=False)
        batch = torch.stack([transform(image) for image in images])
        cams, classes, probabilities = grad_cam(trained.model, batch)
        shown = _display(batch, trained.preprocess)
        for row in range(len(images)):
            if col == 1:
                axes[row, 0].imshow(shown[row])
                axes[row, 0].set_title(titles[row], fontsize=9)
            axes[row, col].imshow(shown[row])
            axes[row, col].imshow(cams[row], cmap="jet", alpha=0.45, vmin=0, vmax=1)
            label = trained.label(int(classes[row]))
            name = f"{trained.model_name} @ {trained.preprocess['input_size']}px"
            axes[row, col].set_title(f"{name}\n{label} ({100 * probabilities[row]:.0f}%)", fontsize=9)
    for ax in axes.flat:
        ax.axis("off")
    figure.tight_layout()
    return figure
