"""A CIFAR-10 net under 200k parameters that still sees (more than) the whole image.

Without max-pooling the resolution is halved by stride-2 convs at the end of C1, C2 and
C3 (32 -> 16 -> 8 -> 4). The receptive field is grown cheaply in two ways: one dilated
conv early, where each pixel is still expensive to cover, and depthwise-separable convs
in C3 and C4, where channels are wide and a full 3x3 conv would spend most of the budget.

The network is built from the declarative `SEPARABLE_NET_BLOCKS` below, and
`receptive_field` reads the kernel, stride and dilation of the same specs, so the figure
it reports is that of the network as built.
"""

from collections.abc import Iterable, Sequence
from typing import NamedTuple

import torch
from torch import nn

from cifar_models.layers import ConvBNAct, SeparableConvBNAct
from cifar_models.registry import register_model


class ConvSpec(NamedTuple):
    out_channels: int
    kernel: int = 3
    stride: int = 1
    dilation: int = 1
    separable: bool = False


# RF after each conv in the comments (input pixels), from `receptive_field`.
SEPARABLE_NET_BLOCKS: tuple[tuple[ConvSpec, ...], ...] = (
    (  # C1, 32x32
        ConvSpec(24),                       # 3
        ConvSpec(32, dilation=2),           # 7: a 5x5 view for the weights of a 3x3
        ConvSpec(32, stride=2),             # 9
    ),
    (  # C2, 16x16
        ConvSpec(48),                       # 13
        ConvSpec(48),                       # 17
        ConvSpec(64, stride=2),             # 21
    ),
    (  # C3, 8x8
        ConvSpec(96, separable=True),       # 29
        ConvSpec(128, separable=True),      # 37
        ConvSpec(128, stride=2, separable=True),  # 45; a full 3x3 conv here would cost 147k alone
    ),
    (  # C4, 4x4
        ConvSpec(144, separable=True),      # 61
        ConvSpec(160, separable=True),      # 77
        ConvSpec(192, separable=True),      # 93
    ),
)


def receptive_field(layers: Iterable[tuple[int, int, int]]) -> int:
    """Receptive field, in input pixels, of a stack of convs given as (kernel, stride, dilation).

    Each layer widens the field by its effective kernel minus one, counted in input pixels
    (`jump`, the product of the strides before it). Pointwise convs, BatchNorm and
    activations leave it unchanged; global pooling is not counted.
    """
    rf, jump = 1, 1
    for kernel, stride, dilation in layers:
        effective_kernel = dilation * (kernel - 1) + 1
        rf += (effective_kernel - 1) * jump
        jump *= stride
    return rf


def rf_layers(blocks: Sequence[Sequence[ConvSpec]]) -> list[tuple[int, int, int]]:
    """The (kernel, stride, dilation) of every spatial conv in `blocks`, in order."""
    return [(spec.kernel, spec.stride, spec.dilation) for block in blocks for spec in block]


class SeparableNet(nn.Module):
    def __init__(self, num_classes: int = 10,
                 blocks: Sequence[Sequence[ConvSpec]] = SEPARABLE_NET_BLOCKS) -> None:
        super().__init__()
        self.specs = tuple(tuple(block) for block in blocks)
        stages = []
        in_channels = 3
        for block in self.specs:
            layers = []
            for spec in block:
                layer = SeparableConvBNAct if spec.separable else ConvBNAct
                layers.append(layer(in_channels, spec.out_channels, spec.kernel,
                                    stride=spec.stride, dilation=spec.dilation))
                in_channels = spec.out_channels
            stages.append(nn.Sequential(*layers))
        self.blocks = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        # A 1x1 conv on the pooled 1x1 map is a linear layer; nn.Linear says so.
        self.head = nn.Linear(in_channels, num_classes)

    def rf_layers(self) -> list[tuple[int, int, int]]:
        """The (kernel, stride, dilation) list this network was built from."""
        return rf_layers(self.specs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.pool(self.blocks(x)), 1))


@register_model
def separable_net(num_classes: int = 10) -> nn.Module:
    return SeparableNet(num_classes)
