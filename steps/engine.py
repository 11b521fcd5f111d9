"""The one training engine that find_lr, train and evaluate share.

Plain functions with explicit arguments: the model, the optimizer, the data as uint8 arrays,
the device and the precision are all passed in; nothing here reads a global or starts a run.
Sections, top to bottom: learning-rate schedules, devices and precision, optimizers, the
whitening init and the weight average, batches, one epoch of training, evaluation, the LR range
test, checkpoints.
"""

import copy
import math
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cifar_models.inference import predict_logits
from cifar_models.preprocess import normalize, to_nchw
from cifar_models.registry import create_model
from steps.augment import Policy, augment_batches, host_to_device
from steps.errors import StepError


class NonFiniteLoss(StepError):
    """The training loss became NaN or infinite; whatever the model holds now is garbage."""


# --- learning-rate schedules: pure functions of the optimizer step --------------------------------

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


# --- device and precision --------------------------------------------------------------------------

@dataclass(frozen=True)
class Hardware:
    device: torch.device
    autocast: torch.dtype | None  # dtype of the forward pass under autocast; None = float32 throughout
    channels_last: bool  # NHWC memory layout for model and inputs (faster convs on tensor cores and oneDNN)


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN runs bf16 convolutions natively on this CPU (AVX512-BF16 or AMX), rather
    than emulating them in float32, which would make bf16 slower, not faster."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def hardware(device: str = "auto", precision: str = "auto") -> Hardware:
    """device auto|cpu|cuda[:n]; precision auto|bf16|fp32.

    auto: CUDA if present. On CUDA, bf16 autocast. On a CPU with native bf16
    (cpu_has_native_bf16), the same: fast_net's training step measured 1276 ms in float32 and
    498 ms with bf16 autocast and channels_last on a 2-core AVX512-BF16 EPYC (batch 256, medians
    of 5; bf16 alone 629 ms, channels_last alone 903 ms). On other CPUs bf16 is emulated and
    slower, so plain float32 there. Under autocast BatchNorm still runs in float32 and the loss
    is taken on float32 logits. channels_last is always on: oneDNN's and cuDNN's convolutions
    are faster in NHWC whatever the dtype, float32 on an AVX2-only CPU included (0.67x to 0.81x
    the NCHW step time at batches 128 to 1024 on a 2-core AVX2 EPYC, 2026-11-21,
    benchmarks/results/step-time-cpu-2core.json).
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise StepError("--device cuda was asked for but no CUDA device is available; use --device cpu or auto")
    if precision not in ("auto", "bf16", "fp32"):
        raise StepError(f"unknown precision {precision!r}; use auto, bf16 or fp32")
    if precision == "auto":
        bf16 = dev.type == "cuda" or (dev.type == "cpu" and cpu_has_native_bf16())
    else:
        bf16 = precision == "bf16"
    if dev.type == "cuda":
        # Every training step has the same shapes, so cuDNN's per-shape search for the fastest
        # convolution algorithm is paid once and then reused.
        torch.backends.cudnn.benchmark = True
    return Hardware(dev, torch.bfloat16 if bf16 else None, channels_last=True)


def autocast(hw: Hardware) -> torch.autocast:
    """The forward pass's precision context: autocast to hw.autocast, or a no-op in float32."""
    return torch.autocast(hw.device.type, dtype=hw.autocast or torch.float32, enabled=hw.autocast is not None)


def prepare_model(model: nn.Module, hw: Hardware) -> nn.Module:
    model = model.to(hw.device)
    return model.to(memory_format=torch.channels_last) if hw.channels_last else model


def build_model(name: str, seed: int, hw: Hardware) -> nn.Module:
    """The named network, initialised from `seed`, on the device in the training layout."""
    torch.manual_seed(seed)
    try:
        model = create_model(name)
    except ValueError as exc:
        raise StepError(str(exc)) from None
    return prepare_model(model, hw)


# --- optimizers ------------------------------------------------------------------------------------

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
# MuonSGD with airbench94_muon's filter momentum 0.6 and the filters' LR at 1/6 of the rest's:
# on the cpu recipe's full run 1/3 tested below SGD (README), although it had done best of 1/6,
# 1/3 and 2/3 on a short run on 20,000 images (a scratch script, so no figures here); the
# longer run wants the smaller filter steps, though not smaller still: 1/12 did worse than 1/6
# on the full run (scratch again, README).
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


# --- the whitening init and the weight average -----------------------------------------------------

def patch_whitening(images: torch.Tensor, kernel: tuple[int, int], eps: float = 5e-4,
                    chunk: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights, bias) of a conv that whitens the kernel-sized patches of normalised (N, C, H, W)
    float images: the patches' covariance is V diag(lambda) V^T, and filter i is the i-th
    eigenvector over sqrt(lambda_i + eps), largest eigenvalue first, so the filter outputs
    are decorrelated with unit variance (eps keeps the near-null directions from being
    amplified into noise). The bias subtracts the patch mean, so the outputs are also centred.
    The filters come twice, as +v and -v: after the GELU that follows, each direction keeps
    both its signs (airbench94's 2 x 12 = 24 channels for 2x2x3 patches).
    """
    c, (h, w) = images.shape[1], kernel
    dim = c * h * w
    total = torch.zeros(dim, dtype=torch.float64)
    outer = torch.zeros(dim, dim, dtype=torch.float64)
    count = 0
    for start in range(0, len(images), chunk):  # ~50 MB of patches at a time, not 230 MB at once
        patches = images[start:start + chunk].unfold(2, h, 1).unfold(3, w, 1)  # N, C, H', W', h, w
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, dim).double()  # rows in (c, h, w) order
        total += patches.sum(0)
        outer += patches.T @ patches
        count += len(patches)
    mean = total / count
    covariance = outer / count - torch.outer(mean, mean)
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)  # ascending
    filters = (eigenvectors.T / torch.sqrt(eigenvalues.clamp(min=0) + eps)[:, None]).flip(0)
    weights = torch.cat([filters, -filters])
    return weights.reshape(2 * dim, c, h, w).float(), (-(weights @ mean)).float()


def whiten_first_conv(model: nn.Module, images: np.ndarray, mean: Sequence[float], std: Sequence[float],
                      eps: float = 5e-4) -> bool:
    """Set the model's `whiten` conv to the patch whitening of these NHWC uint8 training images
    (normalised as training normalises them) and freeze its weights; its bias still trains
    (train_whiten_bias freezes it later).
    Returns False, changing nothing, when the model has no `whiten` conv of the whitening
    shape (2 x C*h*w filters over C input channels).

    Why frozen: the whitened basis is already what the first layer should compute, and
    training it at the high LRs of the fast recipes only makes it drift (airbench94 freezes
    it for the same reason). It is still an ordinary conv: the state_dict loads into a fresh
    create_model(name) unchanged.
    """
    conv = getattr(model, "whiten", None)
    if not isinstance(conv, nn.Conv2d) or conv.bias is None:
        return False
    out_channels, in_channels, h, w = conv.weight.shape
    if out_channels != 2 * in_channels * h * w or conv.stride != (1, 1) or conv.groups != 1:
        return False
    x = normalize(to_nchw(images), mean, std)
    weights, bias = patch_whitening(x, (h, w), eps)
    with torch.no_grad():
        conv.weight.copy_(weights)
        conv.bias.copy_(bias)
    conv.weight.requires_grad_(False)
    return True


def train_whiten_bias(model: nn.Module, trainable: bool) -> None:
    """Let the whitening conv's bias train, or freeze it as its weights are. Frozen, nothing
    before the first block needs a gradient, so backward stops there: it skips the first
    block conv's input gradient and the GELU's, computed at the largest resolution of the net.
    airbench94 trains the bias for its first 3 of ~10 epochs. A model without a `whiten`
    conv is left as it is."""
    conv = getattr(model, "whiten", None)
    if isinstance(conv, nn.Conv2d) and conv.bias is not None:
        conv.bias.requires_grad_(trainable)


def ema_decay_at(decay: float, updates: torch.Tensor | int) -> torch.Tensor:
    """The decay of the `updates`-th average (counted from 1 after the copy): min(decay,
    (1 + n) / (10 + n)), TensorFlow's ExponentialMovingAverage warm-up. Without it a short run
    is mostly its own initial weights: 0.99 ** 194 leaves 14% of the start in the average after
    194 steps (2 epochs at batch 512), and a 2-epoch run on 10,000 images tested at chance (10.3%).
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


# --- batches -----------------------------------------------------------------------------------------

def num_batches(n: int, batch_size: int, drop_last: bool) -> int:
    """Batches per epoch. Training drops the last partial batch (a batch of a few images gives
    BatchNorm noisy statistics and the schedule an uneven step), unless the set is smaller
    than one batch, in which case the whole set is the one batch."""
    if drop_last:
        return max(1, n // batch_size)
    return -(-n // batch_size)


def iterate_batches(x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor, batch_size: int, *,
                    generator: torch.Generator | None = None, drop_last: bool = False,
                    augment: Policy = None, workers: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(N, 3, H, W) uint8 image and int64 label batches from NHWC uint8 images.

    x is the stored set, numpy on the CPU or a tensor already on the device; it stays uint8
    and only each batch is copied out of it. With a generator the order is a fresh permutation
    drawn from it (one per call, i.e. per epoch); without, the stored order. A CPU-side policy
    is applied here, per batch, in `workers` processes (0 = in this one; augment.augment_batches);
    a device-side one is the caller's, after the move.
    """
    cpu_augment = augment is not None and not augment.on_device
    if cpu_augment and isinstance(x, torch.Tensor):
        raise ValueError(f"augmentation {augment.name!r} works on numpy images on the CPU; pass x as numpy")
    n = len(y)
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    count = num_batches(n, batch_size, drop_last)
    if isinstance(x, torch.Tensor):
        order = host_to_device(order, x.device)  # once per epoch, not once per batch
        for b in range(count):
            idx = order[b * batch_size:(b + 1) * batch_size]
            yield to_nchw(x[idx]), torch.as_tensor(y)[idx].to(torch.int64)
        return
    slices = [order[b * batch_size:(b + 1) * batch_size].numpy() for b in range(count)]
    if cpu_augment:
        # One seed per epoch from the training generator: the augmentations replay on resume.
        seed = int(torch.randint(0, 2**31 - 1, (), generator=generator)) if generator is not None else 0
        batches = augment_batches(augment, x, slices, seed, workers)
    else:
        batches = (x[idx] for idx in slices)
    for images, idx in zip(batches, slices):  # batches first: its pool ends as it runs out
        yield to_nchw(images), torch.as_tensor(y[idx], dtype=torch.int64)


# --- one epoch of training ---------------------------------------------------------------------------

def _model_input(images: torch.Tensor, mean: Sequence[float], std: Sequence[float], hw: Hardware,
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
    With `size`, the images are downscaled to size x size after augmentation (engine.downscale).

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
        x = _model_input(images, mean, std, hw, augment, generator, size)
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


# --- evaluation ---------------------------------------------------------------------------------------

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


# --- the LR range test -------------------------------------------------------------------------------

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
            x = _model_input(images, mean, std, hw, augment, generator)
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


# --- checkpoints ---------------------------------------------------------------------------------------

def save_checkpoint(path: Path, state: dict) -> None:
    """Write state to path atomically: to a temporary file in the same folder, flushed and
    fsynced, then renamed over the old one. A crash at any point leaves either the previous
    checkpoint or the new one, never a torn file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    # The rename is durable only once the folder's entry is on disk too.
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_checkpoint(path: Path) -> dict:
    """A checkpoint written by save_checkpoint, loaded on the CPU with weights_only=True (so it
    holds only tensors and plain Python values, and loading it can never run code)."""
    return torch.load(Path(path), map_location="cpu", weights_only=True)


def rng_state(generator: torch.Generator) -> dict:
    """Every random state training draws from, as tensors a weights_only load accepts."""
    state = {"generator": generator.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(generator: torch.Generator, state: dict) -> None:
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
