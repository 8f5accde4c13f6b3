"""What is trained and how fast: freezing by stage, frozen BatchNorm, parameter groups (no weight
decay on BN and bias, layer-wise learning rates) and the optimizers.

The network is seen as an ordered list of parts from input to output: stem, the seven stages, the
1x1 head convolution and the classifier. Every fine-tuning mode is "train the parts from index k
on": head = the classifier only (a linear probe on pooled features), last:N = the last N stages
plus head and classifier, full = everything, gradual = head first, then everything.
"""

from __future__ import annotations

import torch
from torch import nn

from effnet.models.efficientnet import EfficientNet
from effnet.training.config import TrainConfig, parse_finetune

# "gradual" without --layer-decay: earlier stages learn more slowly (fastai's discriminative LRs).
GRADUAL_LAYER_DECAY = 0.75
# "auto" from ImageNet weights on a CPU (README "Training", the CIFAR-10 table): stem and stages 1-3
# frozen and cached, stages 4-7 trained without dropout or stochastic depth, at 6/7 of the model's
# resolution (192 px for the 224-px models): 1.36x fewer pixels per step and per cached view.
AUTO_CPU_FINETUNE = "last:4"
AUTO_CPU_RESOLUTION = 6 / 7


def resolve_auto(config: TrainConfig, device: torch.device, native_size: int | None) -> TrainConfig:
    """The concrete settings for finetune 'auto' and cache_frozen None, saved as such in config.yaml.

    From pretrained weights on a CPU: the last four stages on cached features of the frozen rest,
    which reached a given CIFAR-10 accuracy several times sooner than a full fine-tune; with no
    dropout or stochastic depth (a few epochs of fine-tuning need no extra regularisation) and at
    `cpu_finetune_size(native_size)` (the model's resolution, needed then) unless the config sets
    them. Otherwise (random weights, or a GPU) a full fine-tune with the model's own settings."""
    auto = config.finetune == "auto"
    cpu_recipe = auto and config.pretrained and device.type == "cpu"
    finetune = (AUTO_CPU_FINETUNE if cpu_recipe else "full") if auto else config.finetune
    cache = config.cache_frozen
    if cache is None:
        # --mixup/--cutmix ask to mix images; mixing the cached features instead is opt-in (--cache-frozen).
        can_cache = finetune.startswith("last:") and not (config.mixup or config.cutmix) and config.bn_freeze != "off"
        cache = auto and can_cache
    resolved = config.replace(finetune=finetune, cache_frozen=cache)
    if cpu_recipe:
        if config.img_size is None and native_size is None:
            raise ValueError("resolve_auto needs the model's native_size when the config sets no img_size")
        resolved = resolved.replace(
            img_size=config.img_size or cpu_finetune_size(native_size),
            drop_rate=0.0 if config.drop_rate is None else config.drop_rate,
            drop_path_rate=0.0 if config.drop_path_rate is None else config.drop_path_rate,
        )
    return resolved


def cpu_finetune_size(native_size: int) -> int:
    """The resolution of the CPU recipe: 6/7 of the model's own, to a multiple of 8 (224 -> 192)."""
    return 8 * round(native_size * AUTO_CPU_RESOLUTION / 8)


def model_parts(model: EfficientNet) -> list[nn.Module]:
    """stem, stages 1-7, head conv, classifier: every parameter of the model is in exactly one."""
    return [model.stem, *model.stages, model.head, model.classifier]


def first_trainable_part(model: EfficientNet, config: TrainConfig, epoch: int) -> int:
    """Index in `model_parts` of the first part trained during `epoch` (0 = everything)."""
    mode, count = parse_finetune(config.finetune)
    classifier_only = len(model_parts(model)) - 1
    if mode == "head" or (mode == "gradual" and epoch < config.gradual_head_epochs):
        return classifier_only
    if mode == "last":
        return max(0, classifier_only - 1 - count)
    return 0


def freeze(model: EfficientNet, first_trainable: int) -> None:
    """requires_grad off for the parts before `first_trainable`, on from it."""
    for index, part in enumerate(model_parts(model)):
        part.requires_grad_(index >= first_trainable)


def set_train_mode(model: EfficientNet, first_trainable: int, bn_freeze: str) -> None:
    """`model.train()`, then put back in eval mode what must not change: frozen parts (their BN
    running statistics stay those of the pretrained weights, and stochastic depth is off in a fixed
    feature extractor) with bn_freeze 'auto'; every BatchNorm with 'on'; nothing with 'off'."""
    model.train()
    if bn_freeze == "off":
        return
    for index, part in enumerate(model_parts(model)):
        if index < first_trainable:
            part.eval()
        elif bn_freeze == "on":
            for module in part.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()


def param_groups(model: EfficientNet, config: TrainConfig) -> list[dict]:
    """Parameter groups keyed by (LR scale, weight decay). BN and bias parameters (1-D) get no
    weight decay: decaying BN scales only fights normalisation. With layer decay d, part i of n
    learns at d**(n-1-i) times the base LR. Frozen parameters are included so that 'gradual' can
    unfreeze them later; optimizers skip parameters whose grad is None."""
    layer_decay = config.layer_decay
    if layer_decay is None and parse_finetune(config.finetune)[0] == "gradual":
        layer_decay = GRADUAL_LAYER_DECAY
    parts = model_parts(model)
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for index, part in enumerate(parts):
        scale = layer_decay ** (len(parts) - 1 - index) if layer_decay else 1.0
        for param in part.parameters():
            decay = 0.0 if param.ndim <= 1 else config.weight_decay
            groups.setdefault((scale, decay), []).append(param)
    return [{"params": params, "lr_scale": scale, "weight_decay": decay} for (scale, decay), params in groups.items()]


def build_optimizer(groups: list[dict], config: TrainConfig, lr: float) -> torch.optim.Optimizer:
    """sgd: Nesterov momentum. rmsprop: the paper's settings (decay 0.9, momentum 0.9, eps 1e-3;
    PyTorch adds eps outside the square root, TensorFlow inside, a small difference at this eps).
    adamw: decoupled weight decay."""
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=config.momentum, nesterov=config.momentum > 0)
    if config.optimizer == "rmsprop":
        return torch.optim.RMSprop(groups, lr=lr, alpha=0.9, momentum=config.momentum, eps=1e-3)
    return torch.optim.AdamW(groups, lr=lr)
