"""Two residual networks for 32x32 images: ResNet-18 and the ResNet-9 "custom ResNet"."""

import torch
from torch import nn

from cifar_models.layers import BasicBlock, ConvBNAct, ConvPoolBNAct, Residual
from cifar_models.registry import register_model


class ResNet18(nn.Module):
    """ResNet-18 adapted to CIFAR (kuangliu/pytorch-cifar): the ImageNet stem (7x7 stride-2
    conv and a max-pool) would shrink a 32x32 image to 8x8 before the first stage, so it is
    replaced by one 3x3 stride-1 conv and the four stages see 32, 16, 8 and 4 pixels."""

    def __init__(self, num_classes: int = 10, widths: tuple[int, ...] = (64, 128, 256, 512),
                 blocks_per_stage: int = 2) -> None:
        super().__init__()
        self.stem = ConvBNAct(3, widths[0], 3)
        stages = []
        in_channels = widths[0]
        for i, width in enumerate(widths):
            blocks = []
            for j in range(blocks_per_stage):
                # Each stage after the first halves the resolution in its first block.
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(BasicBlock(in_channels, width, stride))
                in_channels = width
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.fc(torch.flatten(self.pool(x), 1))


class CustomResNet(nn.Module):
    """The ResNet-9 of David Page's DAWNBench CIFAR-10 entry: three conv-pool stages, the
    first and last with a two-conv residual branch, no downsampling inside any residual.

    Spatial sizes: 32 (prep) -> 16 (layer1) -> 8 (layer2) -> 4 (layer3) -> 1 (4x4 max-pool).
    """

    def __init__(self, num_classes: int = 10, widths: tuple[int, int, int, int] = (64, 128, 256, 512)) -> None:
        super().__init__()
        prep, w1, w2, w3 = widths
        self.prep = ConvBNAct(3, prep, 3)
        self.layer1 = nn.Sequential(
            ConvPoolBNAct(prep, w1),
            Residual(nn.Sequential(ConvBNAct(w1, w1), ConvBNAct(w1, w1))),
        )
        self.layer2 = ConvPoolBNAct(w1, w2)
        self.layer3 = nn.Sequential(
            ConvPoolBNAct(w2, w3),
            Residual(nn.Sequential(ConvBNAct(w3, w3), ConvBNAct(w3, w3))),
        )
        self.pool = nn.MaxPool2d(4)
        self.fc = nn.Linear(w3, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.prep(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


@register_model
def resnet18(num_classes: int = 10) -> nn.Module:
    return ResNet18(num_classes)


@register_model
def custom_resnet(num_classes: int = 10) -> nn.Module:
    return CustomResNet(num_classes)
