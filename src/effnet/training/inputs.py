"""What the training loop reads: augmented images, or with `--cache-frozen` the stored outputs of the
frozen prefix (`cached.py`). One object answers the questions that differ between the two (which
module trains, which validates, what a batch looks like), so the loop never asks which it has."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import Dataset

from effnet.data import DataSplits, TransformedDataset, build_transforms
from effnet.models.efficientnet import EfficientNet
from effnet.training.cached import build_feature_cache, frozen_stage_count, trainable_suffix
from effnet.training.config import TrainConfig
from effnet.training.finetune import first_trainable_part


@dataclass
class TrainingInputs:
    train: Dataset  # has set_epoch(epoch): augmentation and cached views are drawn per epoch
    val: Dataset | None
    frozen_stages: int | None = None  # stages whose outputs come from the cache; None: images

    @classmethod
    def build(
        cls, net: EfficientNet, splits: DataSplits, img_size: int, config: TrainConfig, device: torch.device, flip: bool
    ) -> TrainingInputs:
        if config.cache_frozen:
            cut = frozen_stage_count(first_trainable_part(net, config, 0))
            train, val = build_feature_cache(net, cut, splits.train, splits.val, img_size, config, device, flip)
            return cls(train, val, cut)
        augmented = build_transforms(
            net.pretrained_cfg, train=True, augment=config.augment, img_size=img_size, flip=flip
        )
        train = TransformedDataset(splits.train, augmented, config.seed)
        val = TransformedDataset(splits.val, eval_transform(net, img_size), config.seed) if splits.val else None
        return cls(train, val)

    def part(self, net: EfficientNet) -> nn.Module:
        """The part of `net` these inputs feed: the whole network, or the suffix after the cached stages."""
        return net if self.frozen_stages is None else trainable_suffix(net, self.frozen_stages)

    @property
    def first_stage(self) -> int:
        """The 1-based number of the first stage `part` computes (1: the stem comes first)."""
        return 1 + (self.frozen_stages or 0)

    def example(self, batch_size: int, img_size: int, channels_last: bool) -> torch.Tensor:
        """A batch shaped as the loop feeds it (stored features, or seeded random images)."""
        if self.frozen_stages is not None:
            batch = self.train.features[0, :batch_size].float()
        else:
            batch = torch.randn(batch_size, 3, img_size, img_size, generator=torch.Generator().manual_seed(0))
        return batch.contiguous(memory_format=torch.channels_last) if channels_last else batch


def eval_transform(net: EfficientNet, img_size: int):
    return build_transforms(net.pretrained_cfg, train=False, img_size=img_size)
