"""The training loop written once: one step, one epoch, and the test pass.

train, find_lr (through lr_range), evaluate and the benchmarks all step and test through these.
"""

import math
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from torch import nn

from cifar_models.inference import predict_logits
from cifar_models.preprocess import normalize
from steps.augment import Policy, host_to_device
from steps.averaging import WeightAverage
from steps.errors import StepError
from steps.hardware import Hardware, autocast


class NonFiniteLoss(StepError):
    """The training loss became NaN or infinite; whatever the model holds now is garbage."""


def model_input(images: torch.Tensor, mean: Sequence[float], std: Sequence[float], hw: Hardware,
                 augment: Policy, generator: torch.Generator | None, size: int | None = None) -> torch.Tensor:
    images = host_to_device(images, hw.device)
    if augment is not None and augment.on_device:
        images = augment(images, generator)
    x = normalize(images, mean, std)
    if size is not None and size != x.shape[-1]:
        x = downscale(x, size)
    return x.contiguous(memory_format=torch.channels_last) if hw.channels_last else x


def downscale(x: torch.Tensor, size: int) -> torch.Tensor:
    """Float (N, C, H, W) images resized to size x size, antialiased (without the low-pass
    filter, a bilinear downscale only samples the image and aliases fine texture)."""
    return nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: nn.Module, x: torch.Tensor,
               labels: torch.Tensor, hw: Hardware) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward, backward and optimizer step. Returns the mean loss and the number correct,
    as device tensors, so that nothing waits for the device here."""
    with autocast(hw):
        logits = model(x)
        loss = loss_fn(logits.float(), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach(), (logits.argmax(1) == labels).sum()


def train_one_epoch(model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler,
                    batches: Iterable[tuple[torch.Tensor, torch.Tensor]], *, mean: Sequence[float],
                    std: Sequence[float], loss_fn: nn.Module, hw: Hardware, augment: Policy = None,
                    generator: torch.Generator | None = None, ema: WeightAverage | None = None,
                    size: int | None = None, check_every: int = 20, progress=None) -> tuple[float, float]:
    """Train on every batch once, stepping the scheduler per batch. Returns (mean loss, accuracy).
    With `size`, the images are downscaled to size x size after augmentation (downscale).

    Losses and correct counts are summed on the device and read back every `check_every`
    batches (and at the end), so the device is not stalled after every step; a NaN or inf in
    the sum raises NonFiniteLoss, and since checkpoints are only written after an epoch that
    ended finite, a broken model is never saved. `ema`, if given, is updated after every
    optimizer step. `progress` is a tqdm bar or None.
    """
    model.train()
    loss_sum = torch.zeros((), device=hw.device)
    correct = torch.zeros((), device=hw.device, dtype=torch.int64)
    seen = i = 0
    for i, (images, labels) in enumerate(batches, start=1):
        labels = host_to_device(labels, hw.device)
        x = model_input(images, mean, std, hw, augment, generator, size)
        loss, right = train_step(model, optimizer, loss_fn, x, labels, hw)
        scheduler.step()
        if ema is not None:
            ema.update_parameters(model)
        loss_sum += loss * len(labels)
        correct += right
        seen += len(labels)
        if progress is not None:
            progress.update(1)
        if i % check_every == 0:
            _check_finite(loss_sum, i, scheduler)
            if progress is not None:
                progress.set_postfix(loss=f"{loss_sum.item() / seen:.4f}", lr=f"{scheduler.get_last_lr()[0]:.3g}")
    _check_finite(loss_sum, i, scheduler)
    return loss_sum.item() / max(seen, 1), correct.item() / max(seen, 1)


def _check_finite(loss_sum: torch.Tensor, batch: int, scheduler) -> None:
    value = loss_sum.item()
    if not math.isfinite(value):
        lr = scheduler.get_last_lr()[0]
        raise NonFiniteLoss(f"training loss became {value} by batch {batch} of this epoch (LR {lr:.3g}); "
                            "the learning rate is probably too high: lower max_lr (or run find_lr)")


def evaluate(model: nn.Module, x: np.ndarray, y: np.ndarray, mean: Sequence[float], std: Sequence[float], *,
             batch_size: int = 512, tta: str = "none") -> tuple[float, float, torch.Tensor]:
    """(mean cross-entropy, accuracy, CPU float32 logits) over uint8 NHWC images x.

    The forward pass is inference.predict_logits, the one the served model uses. The loss is
    plain cross-entropy, without the label smoothing of training, so it is comparable across
    runs whatever their smoothing.
    """
    model.eval()
    logits = predict_logits(model, x, mean, std, batch_size=batch_size, tta=tta)
    labels = torch.as_tensor(y, dtype=torch.int64)
    if len(labels) == 0:
        return float("nan"), float("nan"), logits
    loss = nn.functional.cross_entropy(logits, labels).item()
    accuracy = (logits.argmax(1) == labels).float().mean().item()
    return loss, accuracy, logits
