"""Building blocks, one idea each, shared by the architectures.

Every convolution that feeds a BatchNorm is bias-free: BatchNorm subtracts the batch mean,
which cancels any constant bias, and adds its own learnable shift, so a conv bias would be
dead weight.
"""

import torch
from torch import nn


def same_padding(kernel: int, dilation: int = 1) -> int:
    """Padding that keeps the spatial size of an odd kernel at stride 1 (and halves it,
    rounding up, at stride 2)."""
    return dilation * (kernel - 1) // 2


class ConvBNAct(nn.Sequential):
    """Conv -> BatchNorm -> activation."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: int = 3,
        stride: int = 1,
        dilation: int = 1,
        act: type[nn.Module] = nn.ReLU,
    ) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel, stride=stride,
                      padding=same_padding(kernel, dilation), dilation=dilation, bias=False),
            nn.BatchNorm2d(out_channels),
            act(),
        )


class ConvPoolBNAct(nn.Sequential):
    """Conv -> 2x2 max-pool -> BatchNorm -> activation.

    Pooling before the normalisation means BatchNorm and the activation run on a quarter
    of the pixels; the order is that of the ResNet-9 / airbench family of fast CIFAR nets.
    """

    def __init__(self, in_channels: int, out_channels: int, act: type[nn.Module] = nn.ReLU) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.MaxPool2d(2),
            nn.BatchNorm2d(out_channels),
            act(),
        )


class SeparableConvBNAct(nn.Sequential):
    """Depthwise kxk conv -> pointwise 1x1 conv -> BatchNorm -> activation.

    The pair factorises one full kxk conv at about 1/out_channels + 1/k^2 of its weights.
    There is no normalisation or nonlinearity between the two halves: they stand in for a
    single linear map, and a ReLU in between was found to hurt (Chollet, Xception).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: int = 3,
        stride: int = 1,
        dilation: int = 1,
        act: type[nn.Module] = nn.ReLU,
    ) -> None:
        super().__init__(
            nn.Conv2d(in_channels, in_channels, kernel, stride=stride,
                      padding=same_padding(kernel, dilation), dilation=dilation,
                      groups=in_channels, bias=False),
            nn.Conv2d(in_channels, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
            act(),
        )


class Residual(nn.Module):
    """x + f(x), for an f that keeps the shape of x."""

    def __init__(self, fn: nn.Module) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fn(x)


class BasicBlock(nn.Module):
    """The two-conv residual block of ResNet-18/34 (He et al. 2016).

    Where the block changes the shape (stride 2 or more channels) the shortcut is a
    1x1 conv + BatchNorm projection; otherwise it is the identity. The ReLU comes after
    the sum, as in the original paper.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.body = nn.Sequential(
            ConvBNAct(in_channels, out_channels, 3, stride=stride),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        else:
            self.shortcut = nn.Identity()
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.shortcut(x))
