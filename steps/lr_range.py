"""Leslie Smith's LR range test, which find_lr runs and train runs when max_lr is 0."""

import copy
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from steps.augment import Policy
from steps.errors import StepError
from steps.hardware import Hardware
from steps.loop import model_input, train_step


@dataclass(frozen=True)
class RangeTest:
    lrs: list[float]  # the LR of each iteration run
    losses: list[float]  # the smoothed, bias-corrected loss at each
    suggestion: float  # the LR at the steepest descent of the smoothed loss
    diverged: bool  # stopped early because the smoothed loss exceeded diverge_factor x its best


def lr_range_test(model: nn.Module, optimizer: torch.optim.Optimizer,
                  make_batches: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]], *,
                  mean: Sequence[float], std: Sequence[float], loss_fn: nn.Module, hw: Hardware,
                  start_lr: float = 1e-7, end_lr: float = 10.0, num_iter: int = 100, beta: float = 0.98,
                  diverge_factor: float = 4.0, augment: Policy = None,
                  generator: torch.Generator | None = None) -> RangeTest:
    """Leslie Smith's LR range test, as torch-lr-finder and fastai's lr_find run it.

    The LR grows exponentially from start_lr to end_lr over num_iter training steps (batches
    from make_batches(), which is called again whenever it runs out). The loss is smoothed
    with an exponential moving average (bias-corrected, as Adam's moments are, so the first
    values are not pulled towards zero), and the test stops once the smoothed loss exceeds
    diverge_factor times the best so far. The suggestion is the LR where the smoothed loss
    falls fastest per unit of log LR, skipping the noisy first 10 and last 5 points when
    there are enough. Model and optimizer are restored afterwards from deep copies of their
    state, so nothing learnt in the test leaks into training.
    """
    if not 0 < start_lr < end_lr or num_iter < 2:
        raise StepError(f"range test needs 0 < start_lr < end_lr and num_iter >= 2, got {start_lr}, {end_lr}, {num_iter}")
    model_state = copy.deepcopy(model.state_dict())
    optimizer_state = copy.deepcopy(optimizer.state_dict())
    lrs: list[float] = []
    losses: list[float] = []
    diverged = False
    try:
        model.train()
        batches = iter(make_batches())
        avg, best = 0.0, math.inf
        for i in range(num_iter):
            lr = start_lr * (end_lr / start_lr) ** (i / (num_iter - 1))
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)  # build_optimizer's multiples hold here too
            try:
                images, labels = next(batches)
            except StopIteration:
                batches = iter(make_batches())
                images, labels = next(batches)
            x = model_input(images, mean, std, hw, augment, generator)
            loss, _ = train_step(model, optimizer, loss_fn, x, labels.to(hw.device), hw)
            value = loss.item()  # one sync per step: fine for a test of a hundred steps
            if not math.isfinite(value):
                diverged = True
                break
            avg = beta * avg + (1 - beta) * value
            smoothed = avg / (1 - beta ** (i + 1))
            lrs.append(lr)
            losses.append(smoothed)
            best = min(best, smoothed)
            if smoothed > diverge_factor * best:
                diverged = True
                break
    finally:
        model.load_state_dict(model_state)
        optimizer.load_state_dict(optimizer_state)
    return RangeTest(lrs, losses, steepest_descent(lrs, losses), diverged)


def steepest_descent(lrs: Sequence[float], losses: Sequence[float], skip_start: int = 10, skip_end: int = 5) -> float:
    """The LR at the most negative d(loss)/d(log LR)."""
    if len(lrs) < 2:
        raise StepError(f"the range test diverged after {len(lrs)} step(s); lower start_lr")
    if len(lrs) > skip_start + skip_end + 2:
        lrs, losses = lrs[skip_start:len(lrs) - skip_end], losses[skip_start:len(losses) - skip_end]
    gradient = np.gradient(np.asarray(losses), np.log(np.asarray(lrs)))
    return float(lrs[int(np.argmin(gradient))])
