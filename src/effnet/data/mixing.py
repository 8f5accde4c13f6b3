"""MixUp (Zhang et al., 2018) and CutMix (Yun et al., 2019) on whole batches, with soft targets.

Each image is mixed with its neighbour in the (already shuffled) batch, as torchvision's v2.MixUp and
CutMix do. All randomness comes from a generator seeded with (seed, step), so a resumed run mixes its
batches exactly as an uninterrupted one would.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F

from effnet.data.loading import derive_seed


class BatchMixer:
    """`mixer(images, labels, step) -> (mixed images, soft targets)`; targets sum to 1 per row.

    With both alphas positive, each batch uses CutMix with probability `switch_prob`, else MixUp.
    """

    def __init__(self, num_classes: int, mixup_alpha: float, cutmix_alpha: float, seed: int, switch_prob: float = 0.5):
        if mixup_alpha < 0 or cutmix_alpha < 0:
            raise ValueError(f"mixup and cutmix alphas must be >= 0, got {mixup_alpha} and {cutmix_alpha}")
        self.num_classes = num_classes
        self.mixup_alpha, self.cutmix_alpha = mixup_alpha, cutmix_alpha
        self.seed, self.switch_prob = seed, switch_prob

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng(derive_seed(self.seed, step))
        use_cutmix = self.cutmix_alpha > 0 and (self.mixup_alpha <= 0 or rng.random() < self.switch_prob)
        alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
        lam = float(rng.beta(alpha, alpha))
        partners = images.roll(1, dims=0)
        if use_cutmix:
            images, lam = self._paste_box(images, partners, lam, rng)
        else:
            images = images * lam + partners * (1.0 - lam)
        one_hot = F.one_hot(labels, self.num_classes).to(images.dtype)
        return images, one_hot * lam + one_hot.roll(1, dims=0) * (1.0 - lam)

    @staticmethod
    def _paste_box(
        images: torch.Tensor, partners: torch.Tensor, lam: float, rng: np.random.Generator
    ) -> tuple[torch.Tensor, float]:
        """Paste a box covering about 1 - lam of the area from the partners; lam becomes the area kept."""
        height, width = images.shape[-2:]
        cut = np.sqrt(1.0 - lam)
        box_h, box_w = int(height * cut), int(width * cut)
        cy, cx = int(rng.integers(height)), int(rng.integers(width))
        top, bottom = np.clip([cy - box_h // 2, cy + box_h // 2], 0, height)
        left, right = np.clip([cx - box_w // 2, cx + box_w // 2], 0, width)
        mixed = images.clone()
        mixed[..., top:bottom, left:right] = partners[..., top:bottom, left:right]
        return mixed, 1.0 - float((bottom - top) * (right - left)) / (height * width)


def make_batch_mixer(num_classes: int, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0, seed: int = 0):
    """A BatchMixer, or None when both alphas are 0 (no mixing: train on hard labels)."""
    if mixup_alpha <= 0 and cutmix_alpha <= 0:
        return None
    return BatchMixer(num_classes, mixup_alpha, cutmix_alpha, seed)
