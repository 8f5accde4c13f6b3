"""The EfficientNet module, built from a `ModelConfig`; its tree mirrors the paper's Figure 2:
`stem` (3x3 conv), `stages` (seven groups of MBConv blocks), `head` (1x1 conv), pooling, dropout
and the `classifier`."""

from __future__ import annotations

from dataclasses import asdict, replace
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from effnet.models.layers import ConvBNAct, MBConv, Stage, recompute_without_running_stats
from effnet.models.spec import ModelConfig


class EfficientNet(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        norm = {"padding": config.padding, "bn_eps": config.bn_eps, "bn_momentum": config.bn_momentum}
        act = config.activation
        self.stem = ConvBNAct(3, config.stem_channels, 3, stride=2, activation=act, **norm)

        stages: list[Stage] = []
        in_channels, block_index = config.stem_channels, 0
        for spec in config.stages:
            blocks = []
            for repeat in range(spec.repeats):
                # Stochastic depth grows linearly with the block's position in the whole network.
                rate = config.drop_path_rate * block_index / config.num_blocks
                blocks.append(
                    MBConv(
                        in_channels,
                        spec.channels,
                        spec.kernel,
                        spec.stride if repeat == 0 else 1,
                        spec.expand_ratio,
                        config.se_ratio,
                        rate,
                        activation=act,
                        **norm,
                    )
                )
                in_channels, block_index = spec.channels, block_index + 1
            stages.append(Stage(*blocks))
        self.stages = nn.Sequential(*stages)

        self.head = ConvBNAct(in_channels, config.head_channels, 1, activation=act, **norm)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(config.drop_rate)
        self.num_features = config.head_channels
        self.classifier: nn.Module = self._make_classifier(config.num_classes)
        self.feature_info = self._describe_feature_maps()
        self.grad_checkpointing = False
        self._init_weights()

    # ----------------------------------------------------------------------------------------
    @property
    def pretrained_cfg(self) -> dict[str, Any]:
        """Default preprocessing (resolution, crop, interpolation, mean, std) as plain data."""
        return asdict(self.config.preprocess)

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    def _make_classifier(self, num_classes: int) -> nn.Module:
        return nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the final linear layer by a freshly initialised one for `num_classes` outputs
        (0 removes it, so the model returns pooled features)."""
        self.config = replace(self.config, num_classes=num_classes)
        self.classifier = self._make_classifier(num_classes)
        if isinstance(self.classifier, nn.Linear):
            _init_linear(self.classifier)

    def _describe_feature_maps(self) -> list[dict[str, int]]:
        """The last stage at each stride (2, 4, 8, 16, 32): what `forward_feature_maps` returns."""
        info, stride = [], 2
        for index, spec in enumerate(self.config.stages):
            stride *= spec.stride
            next_stride = self.config.stages[index + 1].stride if index + 1 < len(self.config.stages) else 2
            if next_stride > 1:
                info.append({"stage": index, "reduction": stride, "channels": spec.channels})
        return info

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                _init_linear(module)

    # ----------------------------------------------------------------------------------------
    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(
                f"EfficientNet expects a batch of RGB images shaped (N, 3, H, W); got {tuple(x.shape)}. "
                "Convert grayscale images to RGB (e.g. x.expand(-1, 3, -1, -1)) and add a batch "
                "dimension with x.unsqueeze(0) for a single image."
            )

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing: in training, keep only each MBConv block's input and recompute
        its inside during the backward pass. Peak training memory falls to a fraction (see
        benchmarks/README.md) for about one more forward pass of compute; outputs and gradients are
        unchanged, and batch norm running statistics are updated once per step, not again when a
        block is recomputed."""
        self.grad_checkpointing = enable

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The head's feature map (N, num_features, H/32, W/32), before pooling."""
        self._check_input(x)
        x = self.stem(x)
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            for stage in self.stages:
                x = stage(x, run_block=_checkpointed)
        else:
            x = self.stages(x)
        return self.head(x)

    def forward_feature_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Feature maps at strides 2, 4, 8, 16 and 32 (see `feature_info`), for detection or
        segmentation heads."""
        self._check_input(x)
        wanted = {item["stage"] for item in self.feature_info}
        maps, x = [], self.stem(x)
        for index, stage in enumerate(self.stages):
            x = stage(x)
            if index in wanted:
                maps.append(x)
        return maps

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        pooled = self.pool(features).flatten(1)
        if pre_logits:
            return pooled
        return self.classifier(self.dropout(pooled))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _checkpointed(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    contexts = partial(recompute_without_running_stats, block)
    return checkpoint(block, x, use_reentrant=False, context_fn=contexts)


def _init_linear(layer: nn.Linear) -> None:
    bound = 1.0 / layer.out_features**0.5
    nn.init.uniform_(layer.weight, -bound, bound)
    nn.init.zeros_(layer.bias)
