"""Optimizers by name (OPTIMIZERS, build_optimizer), Muon for the conv filters (MuonSGD), and
the BatchNorm parameter groups and freezes that the fast recipes' optimizers use."""

from collections.abc import Callable, Iterable

import torch
from torch import nn

from steps.errors import StepError


def orthogonalize(g: torch.Tensor, steps: int = 3) -> torch.Tensor:
    """Roughly U V^T for g = U S V^T, in a few matrix products instead of an SVD: Newton-Schulz
    iterations of the quintic whose coefficients Keller Jordan tuned for Muon, steep at zero so
    that 3 steps suffice. They stop short of convergence: singular values within a tenth of the
    largest end between about 0.7 and 1.2, smaller ones grow some 40-fold (tests/test_engine.py)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g / (g.norm() + 1e-7)  # every singular value <= 1, where the iteration converges
    wide = x.size(0) <= x.size(1)
    x = x if wide else x.T  # iterate on the smaller Gram matrix
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x if wide else x.T


class MuonSGD(torch.optim.Optimizer):
    """Muon for the conv filters, Nesterov SGD (momentum 0.9, L2 decay) for the other weights,
    as airbench94_muon splits them. Each filter bank's update is its Nesterov momentum with its
    singular values set to about 1 (orthogonalize, on the bank flattened to out x in*k*k), so
    every direction moves at the same rate however small its gradient. The bank is first
    rescaled to norm sqrt(out_channels): that keeps the step's size relative to the filters
    fixed, and changes nothing that a BatchNorm after the conv sees (so the filters take no
    weight decay: their norm is set, not learnt). Every conv of this project's models feeds a
    BatchNorm (through a pool or a pointwise conv at most) except fast_net's first, which the
    `fast` and `cpu` recipes whiten and freeze: a frozen tensor gets no gradient and is
    skipped. Filters take filter_lr_ratio times the scheduled LR, so one schedule drives both.
    Which tensors are filters: the 4-D ones.
    """

    def __init__(self, params: Iterable[torch.Tensor], lr: float, weight_decay: float, momentum: float = 0.9,
                 filter_momentum: float = 0.6, filter_lr_ratio: float = 1 / 6, ns_steps: int = 3) -> None:
        params = list(params)
        groups = [dict(params=[p for p in params if p.ndim == 4], filters=True),
                  dict(params=[p for p in params if p.ndim != 4], filters=False)]
        super().__init__([g for g in groups if g["params"]], dict(
            lr=lr, weight_decay=weight_decay, momentum=momentum, filter_momentum=filter_momentum,
            filter_lr_ratio=filter_lr_ratio, ns_steps=ns_steps))

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> None:
        if closure is not None:
            raise ValueError("MuonSGD.step takes no closure")
        for group in self.param_groups:
            mu = group["filter_momentum"] if group["filters"] else group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad if group["filters"] else p.grad.add(p, alpha=group["weight_decay"])
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"].mul_(mu).add_(d)
                d = d.add(buf, alpha=mu)  # Nesterov
                if group["filters"]:
                    p.mul_(len(p) ** 0.5 / p.norm())
                    d = orthogonalize(d.flatten(1), group["ns_steps"]).view_as(p)
                    p.add_(d, alpha=-group["lr"] * group["filter_lr_ratio"])
                else:
                    p.add_(d, alpha=-group["lr"])


# SGD keeps the reference recipe's Nesterov momentum 0.9; Adam's L2 decay goes through the
# gradient, AdamW's is decoupled (scaled by the LR, not by the adaptive denominator). muon is
# MuonSGD with airbench94_muon's filter momentum 0.6 and the filters' LR at 1/6 of the rest's,
# which did better on the cpu recipe's full run than 1/3 or 1/12 (benchmarks/README.md, "CPU recipe").
OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "sgd": lambda params, lr, weight_decay: torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True,
                                                            weight_decay=weight_decay),
    "adam": lambda params, lr, weight_decay: torch.optim.Adam(params, lr=lr, weight_decay=weight_decay),
    "adamw": lambda params, lr, weight_decay: torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay),
    "muon": lambda params, lr, weight_decay: MuonSGD(params, lr=lr, weight_decay=weight_decay),
}


def build_optimizer(name: str, model: nn.Module, lr: float, weight_decay: float,
                    bn_bias_lr: float = 1.0) -> torch.optim.Optimizer:
    """The named optimizer over model's parameters. bn_bias_lr != 1 (sgd only) puts the
    BatchNorm biases in a second group whose LR is that multiple of the rest's (lambda_scheduler
    reads the group's `lr_scale`) and whose L2 coefficient is divided by it, so that their decay
    per step, LR x coefficient, stays the other weights'."""
    try:
        builder = OPTIMIZERS[name]
    except KeyError:
        raise StepError(f"unknown optimizer {name!r}; known: {', '.join(OPTIMIZERS)}") from None
    if bn_bias_lr == 1.0:
        return builder(model.parameters(), lr, weight_decay)
    if name != "sgd":
        raise StepError(f"bn_bias_lr other than 1 needs optimizer sgd, not {name!r}")
    biases = bn_biases(model)
    ids = {id(p) for p in biases}
    rest = [p for p in model.parameters() if id(p) not in ids]
    return builder([dict(params=rest), dict(params=biases, lr_scale=bn_bias_lr, weight_decay=weight_decay / bn_bias_lr)],
                   lr, weight_decay)


def bn_biases(model: nn.Module) -> list[nn.Parameter]:
    return [m.bias for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.bias is not None]


def freeze_bn_scales(model: nn.Module) -> None:
    """Fix every BatchNorm's scale (weight) at its value, 1 when fresh, as airbench94 does. The
    convolution before each BatchNorm can set its output's scale itself, so the BatchNorm's
    own scale adds a direction that weight decay pulls on but nothing needs; the biases, which
    set where each GELU bends, keep training (bn_bias_lr speeds them up)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None:
            m.weight.requires_grad_(False)
