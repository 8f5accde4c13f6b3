"""Train and eval transforms (torchvision transforms v2) from a model's preprocessing values.

Input: uint8 RGB tensors 3 x H x W (what every ImageSplit yields). Output: float32 normalised with the
model's mean and std, at the model's resolution (`preprocess["input_size"]`, or `img_size`).

Eval follows the ImageNet convention the pretrained weights were measured with: resize the short side
to `input_size / crop_pct`, centre-crop `input_size`. Except for *tiny* sources, whose short side is at
most half the output size (CIFAR's 32x32 at 224 or 128, digits' 8x8): they are photographed tightly and
already lose detail to upsampling, so cropping another 12.5% away would only hurt; they are resized
whole (crop_pct taken as 1). Small images are therefore always upsampled to the model's resolution:
feeding 32x32 images to a 224 model is how the classic tutorials got 78% on CIFAR-10.

Train presets, each starting with a random resized crop to the output size and a horizontal flip (left out
with `flip=False`, e.g. for handwriting, where a mirrored digit is no digit):

* `none`: no randomness, the eval transform (for debugging, or data where flips change the label).
* `light`: the crop and flip only (the classic tutorials' zoom/shift/flip). The crop keeps 25-100% of
  the area of ordinary photos; of tiny images it keeps 64-100% (at least 80% of each side, close to
  the usual 4-pixel-padding crop of CIFAR), since a 8%-area crop of a 32x32 image is a 9x9 blur.
* `randaugment`, `autoaugment` (ImageNet policy), `trivialaugment`: the crop and flip, then the policy
  on the uint8 image (its rotations and shears interpolate bilinearly: tensors support no bicubic there).
  Tiny sources get the flip and the policy *before* the crop upsamples them: at 32x32 the policies
  work on 49x fewer pixels than at 224 (and that is the resolution they were designed for on CIFAR).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

AUGMENT_PRESETS = ("none", "light", "randaugment", "autoaugment", "trivialaugment")
CROP_SCALE = (0.25, 1.0)
TINY_CROP_SCALE = (0.64, 1.0)


def is_tiny(image: torch.Tensor, size: int) -> bool:
    """A source whose short side is at most half the output size (it is upsampled 2x or more)."""
    return 2 * min(image.shape[-2:]) <= size


class ResizeCenterCrop:
    """Resize the short side to size / crop_pct and centre-crop size x size (crop_pct 1 for tiny sources)."""

    def __init__(self, size: int, crop_pct: float, interpolation: v2.InterpolationMode):
        self.size, self.crop_pct, self.interpolation = size, crop_pct, interpolation

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        crop_pct = 1.0 if is_tiny(image, self.size) else self.crop_pct
        image = F.resize(image, [int(round(self.size / crop_pct))], self.interpolation, antialias=True)
        return F.center_crop(image, [self.size, self.size])

    def __repr__(self) -> str:
        return f"ResizeCenterCrop(size={self.size}, crop_pct={self.crop_pct}, {self.interpolation.value})"


class BySourceSize:
    """Apply `tiny` to tiny sources (see `is_tiny`) and `regular` to the others."""

    def __init__(self, size: int, tiny: Callable, regular: Callable):
        self.size, self.tiny, self.regular = size, tiny, regular

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return (self.tiny if is_tiny(image, self.size) else self.regular)(image)

    def __repr__(self) -> str:
        return f"BySourceSize(size={self.size},\n  tiny={self.tiny},\n  regular={self.regular})"


def _augmentation(size: int, augment: str, interpolation: v2.InterpolationMode, flip: bool) -> BySourceSize:
    # Rotations and shears on tensors support nearest and bilinear only.
    bilinear = v2.InterpolationMode.BILINEAR
    policies = {
        "light": [],
        "randaugment": [v2.RandAugment(interpolation=bilinear)],
        "autoaugment": [v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET, interpolation=bilinear)],
        "trivialaugment": [v2.TrivialAugmentWide(interpolation=bilinear)],
    }
    policy = policies[augment]
    mirror = [v2.RandomHorizontalFlip()] if flip else []

    def crop(scale: tuple[float, float]) -> v2.RandomResizedCrop:
        return v2.RandomResizedCrop(size, scale=scale, interpolation=interpolation, antialias=True)

    return BySourceSize(
        size,
        # Tiny sources are flipped and augmented before upsampling: far fewer pixels to process.
        tiny=v2.Compose([*mirror, *policy, crop(TINY_CROP_SCALE)]),
        regular=v2.Compose([crop(CROP_SCALE), *mirror, *policy]),
    )


def _output_size(preprocess: Mapping[str, Any], img_size: int | None) -> int:
    size = img_size or preprocess["input_size"]
    # timm's pretrained_cfg writes input_size as (3, H, W).
    return int(size[-1] if isinstance(size, (tuple, list)) else size)


def build_transforms(
    preprocess: Mapping[str, Any],
    train: bool,
    augment: str = "light",
    img_size: int | None = None,
    flip: bool = True,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The train (`train=True`, preset `augment`) or eval transform for a model's `preprocess` mapping
    (input_size, crop_pct, interpolation, mean, std: `model.pretrained_cfg`); `img_size` overrides input_size.
    `flip=False` leaves out the random horizontal flip (data whose mirror image changes the label)."""
    if augment not in AUGMENT_PRESETS:
        raise ValueError(f"unknown augmentation preset {augment!r}; choose one of {', '.join(AUGMENT_PRESETS)}")
    size = _output_size(preprocess, img_size)
    interpolation = v2.InterpolationMode(preprocess.get("interpolation", "bilinear"))
    if not train or augment == "none":
        resize_or_augment: Callable = ResizeCenterCrop(size, float(preprocess.get("crop_pct", 1.0)), interpolation)
    else:
        resize_or_augment = _augmentation(size, augment, interpolation, flip)
    return v2.Compose(
        [
            resize_or_augment,
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=list(preprocess["mean"]), std=list(preprocess["std"])),
        ]
    )


def flip_tta(
    forward: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, logits: torch.Tensor | None = None
) -> torch.Tensor:
    """Flip test-time augmentation: the mean of the logits of each image (N, C, H, W) and of its
    mirror image, the one definition every evaluator uses (`fit`'s test, `effnet eval`, `predict`).
    `logits`: the images' own, when already computed."""
    own = forward(images) if logits is None else logits
    return (own.float() + forward(images.flip(3)).float()) / 2
