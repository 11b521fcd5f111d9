"""Learning-rate schedules: pure functions of the optimizer step, and the scheduler that applies one.

SCHEDULES maps TrainConfig.schedule to a builder of the schedule for a config, its peak LR and
its total number of steps; lambda_scheduler sets an optimizer's LR to it at every step.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from steps.recipes import TrainConfig


def _ramp(step: float, start_step: float, end_step: float, start: float, end: float) -> float:
    """Linear interpolation from `start` at start_step to `end` at end_step."""
    if end_step <= start_step:
        return end
    t = min(max((step - start_step) / (end_step - start_step), 0.0), 1.0)
    return start + t * (end - start)


def one_cycle_lr(step: int, total_steps: int, max_lr: float, pct_start: float,
                 div_factor: float, final_div_factor: float) -> float:
    """The one-cycle schedule of the reference recipe, two linear phases, no annihilation:

    1. steps 0 .. pct_start*total_steps: up from max_lr/div_factor to max_lr;
    2. from there to total_steps: down to max_lr/final_div_factor.

    The reference ran 24 epochs with the peak at epoch 5, i.e. pct_start = 5/24. Note that
    final_div_factor divides max_lr here, where torch's OneCycleLR divides the initial LR by it.
    Step i is the LR used by the i-th optimizer step (0-based), so step total_steps, where the
    last value is reached, is one past the last step taken.
    """
    peak = pct_start * total_steps
    if step <= peak:
        return _ramp(step, 0, peak, max_lr / div_factor, max_lr)
    return _ramp(step, peak, total_steps, max_lr, max_lr / final_div_factor)


def warmup_linear_lr(step: int, total_steps: int, max_lr: float, warmup_steps: int,
                     start_factor: float = 0.0, end_factor: float = 0.0) -> float:
    """Warm-up then linear decay, for short fast recipes:

    1. steps 0 .. warmup_steps: up from start_factor*max_lr to max_lr;
    2. warmup_steps .. total_steps: down to end_factor*max_lr.
    """
    if step <= warmup_steps:
        return _ramp(step, 0, warmup_steps, start_factor * max_lr, max_lr)
    return _ramp(step, warmup_steps, total_steps, max_lr, end_factor * max_lr)


def lambda_scheduler(optimizer: torch.optim.Optimizer, lr_at: Callable[[int], float]) -> torch.optim.lr_scheduler.LambdaLR:
    """A scheduler that sets the LR to lr_at(step) exactly, or to lr_scale times it in a group
    that has an `lr_scale` (build_optimizer's BatchNorm biases). LambdaLR multiplies each group's
    base LR by the lambda, so the base LR is set to 1. Its state is the step count, which a
    checkpoint stores as a plain int (the lambdas themselves are not saved, and need not be)."""
    for group in optimizer.param_groups:
        group["lr"] = 1.0
        group.pop("initial_lr", None)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, [lambda step, scale=group.get("lr_scale", 1.0): scale * lr_at(step) for group in optimizer.param_groups])


SCHEDULES: dict[str, Callable[[TrainConfig, float, int], Callable[[int], float]]] = {
    "one_cycle": lambda cfg, max_lr, total: partial(
        one_cycle_lr, total_steps=total, max_lr=max_lr, pct_start=cfg.pct_start,
        div_factor=cfg.div_factor, final_div_factor=cfg.final_div_factor),
    "warmup_linear": lambda cfg, max_lr, total: partial(
        warmup_linear_lr, total_steps=total, max_lr=max_lr, warmup_steps=round(cfg.pct_start * total)),
}
