"""Training that fits a time budget: the run times a few of its own steps and one test pass on
the machine it is on, then fixes the number of epochs (and so of low-resolution epochs, a fixed
fraction of them) that fit what is left of the budget, testing every few epochs where a test
pass after each would take more than TEST_SHARE of it. The schedule is then known before the
first real step, as with a fixed epoch count, and a budget run equals a run given the epochs
it chose. The same recipe so takes its 15 minutes on a fast host and on a slow one, and learns
more where more fits.
"""

import copy
import logging
import math
import re
import time
from dataclasses import dataclass, replace

import torch

from steps import checkpoints, loop, schedules
from steps.batches import num_batches
from steps.data import CifarData
from steps.errors import StepError
from steps.hardware import Hardware
from steps.recipes import TrainConfig, epoch_size, tests_after
from steps.training import EVAL_BATCH, Training, train_epoch

log = logging.getLogger(__name__)

WARMUP_STEPS = 2  # untimed: oneDNN/cuDNN choose their kernels (and torch.compile compiles) on the first steps
PROBE_SECONDS = 3.0  # about this long is timed per image size: enough steps that one slow step does not decide
MAX_PROBE_STEPS = 50
PROBE_TEST_IMAGES = 2048  # one test pass is timed on this many test images and scaled to the whole set
# The epochs are chosen to fill this share of what is left: a step's time on a shared machine
# wanders by a few percent, and an epoch more than fits would overrun by a whole epoch.
FILL = 0.97
# Test passes train nothing: under a budget they get at most this share of it, by testing every
# few epochs rather than after each (a recipe's test_every is never lowered; the last epoch is
# always tested). On a 2-core CPU a pass after each epoch took 18% of a 15-minute budget.
TEST_SHARE = 0.05
MAX_EPOCHS = 10_000

_UNITS = {"": 1, "s": 1, "m": 60, "min": 60, "h": 3600}
_AMOUNT = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(min|[smh]?)")


def parse_seconds(text: str | float | int) -> float:
    """A budget as given on the command line: seconds as a number, or a number with a unit (90s,
    15m, 1.5h, 1h30m); 0 = no budget."""
    if isinstance(text, (int, float)):
        seconds = float(text)
    else:
        text = text.strip().lower()
        parts = _AMOUNT.findall(text)
        if not parts or _AMOUNT.sub("", text).strip():
            raise StepError(f"time budget {text!r} is not a duration; give seconds (900) or a unit (90s, 15m, 1h)")
        seconds = sum(float(number) * _UNITS[unit] for number, unit in parts)
    if not math.isfinite(seconds) or seconds < 0:
        raise StepError(f"time budget must be 0 (off) or a positive duration; got {text!r}")
    return seconds


@dataclass(frozen=True)
class Pace:
    """What this machine takes for cfg's training, measured by measure_pace."""
    step_seconds: float  # one training step at full size
    low_res_step_seconds: float  # one at cfg.low_res (= step_seconds when the recipe has none)
    test_seconds: float  # one test pass over the whole test set
    probe_seconds: float  # what measuring these took


@dataclass(frozen=True)
class Fit:
    epochs: int
    low_res_epochs: int
    test_every: int
    predicted_seconds: float  # the chosen epochs' training and test passes, by the pace
    seconds_left: float  # of the budget, when the epochs were chosen
    pace: Pace

    def reason(self, budget: float) -> str:
        low = f" ({self.low_res_epochs} at low resolution)" if self.low_res_epochs else ""
        return (f"{self.epochs} epochs{low} fit the time budget of {budget:.0f} s: "
                f"{self.seconds_left:.1f} s left after {self.pace.probe_seconds:.1f} s of timing, the epochs take "
                f"{self.predicted_seconds:.1f} s at {1000 * self.pace.step_seconds:.1f} ms a step"
                + (f" ({1000 * self.pace.low_res_step_seconds:.1f} ms at low resolution)" if self.low_res_epochs else "")
                + f" and {self.pace.test_seconds:.2f} s a test pass, run after "
                + ("every epoch" if self.test_every == 1 else f"every {self.test_every} epochs and the last"))


def _synchronize(hw: Hardware) -> None:
    if hw.device.type == "cuda":
        torch.cuda.synchronize(hw.device)


def _time_steps(cfg: TrainConfig, training: Training, epoch: int, train_set: tuple, data: CifarData,
                hw: Hardware) -> float:
    """Seconds per training step of cfg's `epoch` (its image size), after WARMUP_STEPS untimed."""
    scheduler = schedules.lambda_scheduler(training.optimizer, lambda step: 1e-4)  # any LR times the same
    started = time.perf_counter()
    train_epoch(cfg, training, scheduler, epoch, train_set, data, hw, max_steps=WARMUP_STEPS)
    _synchronize(hw)
    # Warm-up steps are the slow ones, so this guess at the step count errs towards fewer.
    guess = (time.perf_counter() - started) / WARMUP_STEPS
    steps = max(3, min(MAX_PROBE_STEPS, math.ceil(PROBE_SECONDS / max(guess, 1e-6))))
    started = time.perf_counter()
    train_epoch(cfg, training, scheduler, epoch, train_set, data, hw, max_steps=steps)
    _synchronize(hw)
    return (time.perf_counter() - started) / steps


def measure_pace(cfg: TrainConfig, training: Training, train_set: tuple, data: CifarData, hw: Hardware) -> Pace:
    """Time cfg's steps (at full size and, if it has one, at its low resolution) and a test pass
    on training's own model, then put every state back as it was, so the run goes on exactly
    as if nothing had been timed."""
    started = time.perf_counter()
    saved = copy.deepcopy({"model": training.model.state_dict(), "optimizer": training.optimizer.state_dict(),
                           "ema": training.ema.state_dict() if training.ema is not None else None,
                           "rng": checkpoints.rng_state(training.generator)})
    # A two-epoch version of cfg whose first epoch is at low resolution, if cfg has one.
    probe = replace(cfg, epochs=2, low_res_pct=0.5 if cfg.low_res else 0.0)
    try:
        full = _time_steps(probe, training, 2, train_set, data, hw)
        low = _time_steps(probe, training, 1, train_set, data, hw) if cfg.low_res else full
        n = min(len(data.test_y), PROBE_TEST_IMAGES)
        test = 0.0
        if n:
            loop.evaluate(training.result, data.test_x[:EVAL_BATCH // 4], data.test_y[:EVAL_BATCH // 4],
                          data.mean, data.std, batch_size=EVAL_BATCH)  # warm-up
            t = time.perf_counter()
            loop.evaluate(training.result, data.test_x[:n], data.test_y[:n], data.mean, data.std, batch_size=EVAL_BATCH)
            test = (time.perf_counter() - t) * len(data.test_y) / n
    finally:
        training.model.load_state_dict(saved["model"])
        training.optimizer.load_state_dict(saved["optimizer"])
        if training.ema is not None:
            training.ema.load_state_dict(saved["ema"])
        checkpoints.set_rng_state(training.generator, saved["rng"])
    return Pace(full, low, test, time.perf_counter() - started)


def predicted_seconds(cfg: TrainConfig, epochs: int, steps_per_epoch: int, pace: Pace) -> float:
    """cfg's training and test passes for `epochs` epochs at this pace."""
    at = replace(cfg, epochs=epochs)
    low = sum(1 for e in range(1, epochs + 1) if epoch_size(at, e) is not None)
    tests = sum(1 for e in range(1, epochs + 1) if tests_after(at, e))
    return steps_per_epoch * (low * pace.low_res_step_seconds + (epochs - low) * pace.step_seconds) \
        + tests * pace.test_seconds


def spaced_test_every(cfg: TrainConfig, epochs: int, pace: Pace, seconds_left: float) -> int:
    """cfg's test_every, raised so that the test passes of `epochs` epochs take at most
    TEST_SHARE of seconds_left (the last epoch's pass is always run)."""
    passes = max(1, math.floor(TEST_SHARE * seconds_left / pace.test_seconds)) if pace.test_seconds > 0 else epochs
    return max(cfg.test_every, math.ceil(epochs / passes))


def fit_epochs(cfg: TrainConfig, steps_per_epoch: int, pace: Pace, seconds_left: float) -> Fit:
    """The most epochs whose training and test passes fit FILL of seconds_left; at least one,
    with a warning when even that does not fit."""
    def fitted(epochs: int) -> TrainConfig:
        return replace(cfg, epochs=epochs, test_every=spaced_test_every(cfg, epochs, pace, seconds_left))

    epochs = 1
    while epochs < MAX_EPOCHS and predicted_seconds(fitted(epochs + 1), epochs + 1, steps_per_epoch,
                                                    pace) <= FILL * seconds_left:
        epochs += 1
    at = fitted(epochs)
    predicted = predicted_seconds(at, epochs, steps_per_epoch, pace)
    if predicted > seconds_left:
        log.warning("time budget: even one epoch takes %.1f s here, more than the %.1f s left; training one",
                    predicted, seconds_left)
    low = sum(1 for e in range(1, epochs + 1) if epoch_size(at, e) is not None)
    return Fit(epochs, low, at.test_every, predicted, seconds_left, pace)


def fit_budget(cfg: TrainConfig, training: Training, train_set: tuple, data: CifarData, hw: Hardware,
               spent: float) -> tuple[TrainConfig, Fit]:
    """cfg with the epochs (and test_every) that fit its time_budget, `spent` seconds of which
    are already gone (a range test, say), and how they were chosen."""
    pace = measure_pace(cfg, training, train_set, data, hw)
    steps_per_epoch = num_batches(len(data.train_y), cfg.batch_size, drop_last=True)
    fit = fit_epochs(cfg, steps_per_epoch, pace, cfg.time_budget - spent - pace.probe_seconds)
    log.info("time budget: %s", fit.reason(cfg.time_budget))
    return replace(cfg, epochs=fit.epochs, test_every=fit.test_every), fit
