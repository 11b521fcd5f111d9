"""Conv filters that start as the identity (airbench's dirac init)."""

from torch import nn


def dirac_init(model: nn.Module) -> None:
    """Set the first in_channels filters of every plain Conv2d (groups 1) to the identity: a 1
    at the kernel's centre on the filter's own input channel, 0 elsewhere; the other filters
    keep their random init. Each conv then starts by passing its input on to its BatchNorm;
    in the cpu recipe's nine epochs that tested 0.3 points higher (benchmarks/README.md,
    "Settings re-chosen on the lossless copy"). Where the recipe whitens, whiten_first_conv
    sets the first conv afterwards."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and m.groups == 1:
            nn.init.dirac_(m.weight.data[:m.in_channels])
