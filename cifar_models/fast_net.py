"""A small, fast CIFAR-10 net after Keller Jordan's airbench94; the default for smoke runs.

Plain float32 modules with no device or dtype of their own: it trains on a CPU as it is,
and on a GPU the training code may add channels_last and bf16 autocast around it.
"""

import torch
from torch import nn

from cifar_models.layers import ConvBNAct, ConvPoolBNAct
from cifar_models.registry import register_model


class FastNet(nn.Module):
    """First conv -> GELU -> three conv-pool blocks -> global max-pool -> linear -> scale.

    Spatial sizes: 32 -> 31 (2x2 conv, no padding) -> 15 -> 7 -> 3 -> 1.
    """

    def __init__(self, num_classes: int = 10, widths: tuple[int, int, int] = (64, 256, 256),
                 whiten_channels: int = 24, logit_scale: float = 1 / 9) -> None:
        super().__init__()
        # The first conv has airbench's whitening shape: 2x2 patches of 3 channels are
        # 12-dimensional, and 24 = 2 x 12 filters leave room for each whitening direction
        # and its negative. Here it is an ordinary learnable conv (with bias, as no
        # BatchNorm follows it); the training code may overwrite its weights with the
        # patch-whitening basis of the training set and freeze them, which is a choice
        # about training, not about the architecture.
        self.whiten = nn.Conv2d(3, whiten_channels, 2, padding=0, bias=True)
        self.act = nn.GELU()
        blocks = []
        in_channels = whiten_channels
        for width in widths:
            blocks.append(nn.Sequential(
                ConvPoolBNAct(in_channels, width, act=nn.GELU),
                ConvBNAct(width, width, 3, act=nn.GELU),
            ))
            in_channels = width
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveMaxPool2d(1)
        # No bias, as in airbench: CIFAR-10's classes are balanced, so a per-class offset
        # has nothing to learn that the features cannot carry.
        self.head = nn.Linear(in_channels, num_classes, bias=False)
        # Max-pooled GELU features are large, so the raw logits start out large and the
        # softmax saturates early in training; a fixed scale below one acts as a softmax
        # temperature and keeps the first steps stable. Plain float, not a buffer: it is
        # part of the architecture, given again when the model is rebuilt.
        self.logit_scale = logit_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.act(self.whiten(x)))
        return self.head(torch.flatten(self.pool(x), 1)) * self.logit_scale


@register_model
def fast_net(num_classes: int = 10) -> nn.Module:
    return FastNet(num_classes)


@register_model
def fast_net_small(num_classes: int = 10) -> nn.Module:
    """fast_net at half the width (32/128/128, 498,104 parameters) and about a third of the
    cost of a training step on a CPU (benchmarks/README.md, "CPU recipe"): three times the
    epochs in the same minutes, which the `cpu` recipe spends."""
    return FastNet(num_classes, widths=(32, 128, 128))
