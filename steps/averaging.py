"""The exponential moving average of the weights (TrainConfig.ema) and its warm-up."""

import copy

import torch
from torch import nn


def ema_decay_at(decay: float, updates: torch.Tensor | int) -> torch.Tensor:
    """The decay of the `updates`-th average (counted from 1 after the copy): min(decay,
    (1 + n) / (10 + n)), TensorFlow's ExponentialMovingAverage warm-up. Without it a short run
    is mostly its own initial weights (0.99 ** 194 leaves 14% of the start in the average after
    194 steps, 2 epochs at batch 512), and a 2-epoch run tested at chance
    (benchmarks/README.md, "CPU recipe").
    A 0-dim float64 tensor on the count's device: computed there, the decay never makes the
    host wait for a GPU, as reading the count back every step would."""
    n = torch.as_tensor(updates).double()
    return ((1 + n) / (10 + n)).clamp(max=decay)


class WeightAverage(nn.Module):
    """An exponential moving average of a model's weights, updated by update_parameters(model)
    after each optimizer step: w_ema <- d * w_ema + (1 - d) * w, with d = ema_decay_at(decay,
    n) rising to `decay` over the first updates; the first update (n = 0) copies. BatchNorm's
    running statistics are averaged too, so the average is a network that can be evaluated as
    it is, without a pass to recompute them. Its state_dict (the module's under `module.`, plus
    the count n_averaged that the warm-up reads) goes into checkpoints; `.module` is the network.

    torch's AveragedModel computes the same (this replaces it, with the same state_dict keys),
    but keeps its count on the CPU and copies it to the GPU, and tests it, at every update:
    each of those makes the host wait until the GPU has finished the step. Here the count lives
    on the model's device and the copy-or-average choice is made there, so an update only
    queues work.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        super().__init__()
        self.module = copy.deepcopy(model)
        self.decay = decay
        device = next(model.parameters()).device
        self.register_buffer("n_averaged", torch.zeros((), dtype=torch.long, device=device))

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    @torch.no_grad()
    def update_parameters(self, model: nn.Module) -> None:
        averaged = [*self.module.parameters(), *self.module.buffers()]
        current = [t.detach() for t in (*model.parameters(), *model.buffers())]
        floats = [(a, c) for a, c in zip(averaged, current, strict=True) if a.is_floating_point()]
        d = torch.where(self.n_averaged == 0, 0.0, ema_decay_at(self.decay, self.n_averaged))
        if floats:
            a, c = map(list, zip(*floats))
            torch._foreach_mul_(a, d)
            torch._foreach_add_(a, torch._foreach_mul(c, 1 - d))
        for a, c in zip(averaged, current):
            if not a.is_floating_point():  # BatchNorm's num_batches_tracked: a count, copied
                a.copy_(c)
        self.n_averaged += 1
