"""A config, trained: start_training builds what a run of a TrainConfig steps (model,
whitening, optimizer, EMA, augmentation, loss) and train_epoch runs one epoch of it. train and
benchmarks/train_speed both go through them, so the benchmark times the recipe train runs.
"""

import itertools
import logging
import os
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn

from steps import batches, distributed, loop
from steps.augment import Policy, build_policy, epoch_flips
from steps.averaging import WeightAverage
from steps.data import CifarData
from steps.dirac import dirac_init
from steps.hardware import Hardware, build_model
from steps.optim import build_optimizer, freeze_bn_scales
from steps.recipes import TrainConfig, epoch_size, whiten_bias_trains
from steps.whiten import train_whiten_bias, whiten_first_conv

log = logging.getLogger(__name__)

EVAL_BATCH = 1024  # images per forward in the test passes (train's per epoch, the benchmark's at the end)
WHITEN_IMAGES = 5000  # airbench94's sample: plenty for a 12x12 covariance
# A cap, so that a many-core GPU host does not fork dozens of processes every epoch: 8 keep up
# with a GPU's batches at the reference policy's cost per image (benchmarks/README.md, "Augmentation").
MAX_AUGMENT_WORKERS = 8


@dataclass(frozen=True)
class Training:
    """What one training run of a config steps through its epochs (start_training builds it).
    The objects inside change as it trains; a resume loads its checkpoint into them."""
    model: nn.Module  # what is averaged, tested and saved
    step_model: nn.Module  # the model, compiled when cfg.compile: what the training steps run
    optimizer: torch.optim.Optimizer  # its LR is the scheduler's, built once max_lr is known
    ema: WeightAverage | None
    generator: torch.Generator  # shuffling and augmentation
    policy: Policy
    loss_fn: nn.Module
    shard: distributed.Shard | None = None  # a data-parallel rank's part of each batch (data_parallel); None = all

    @property
    def result(self) -> nn.Module:
        """With an EMA, the averaged network is the result: it is what is tested and saved."""
        return self.ema.module if self.ema is not None else self.model


def start_training(cfg: TrainConfig, data: CifarData, hw: Hardware) -> Training:
    """cfg's run before its first step: the model built (and whitened) on hw. Its scheduler is
    the caller's, since the peak LR may come from a range test on this model."""
    model = build_model(cfg.model, cfg.seed, hw)
    if cfg.dirac:
        dirac_init(model)
    if cfg.whiten and not whiten_first_conv(model, data.train_x[:WHITEN_IMAGES], data.mean, data.std):
        log.warning("whiten: %s has no whitening conv (a `whiten` Conv2d of 2 x C*h*w filters); left as it is",
                    cfg.model)
    if cfg.freeze_bn_scale:
        freeze_bn_scales(model)
    optimizer = build_optimizer(cfg.optimizer, model, 1.0, cfg.weight_decay, cfg.bn_bias_lr)
    return Training(
        model=model,
        # Compiled for the training steps only; the plain module (same parameters) is what is
        # averaged, evaluated and saved, so state_dict keys carry no _orig_mod prefix.
        step_model=torch.compile(model, mode=compile_mode(hw)) if cfg.compile else model,
        optimizer=optimizer,
        # The average starts as a copy of the initial (whitened) weights; a resume overwrites it.
        ema=WeightAverage(model, cfg.ema) if cfg.ema > 0 else None,
        generator=torch.Generator().manual_seed(cfg.seed),
        policy=build_policy(cfg.aug, data.mean),
        loss_fn=nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing))


def compile_mode(hw: Hardware) -> str | None:
    """torch.compile's mode for the training steps: on CUDA, "reduce-overhead", which replays
    each step's forward and backward kernels as one CUDA graph. Without it the fast recipe's
    loop is bound by the host launching kernels, the GPU idle for most of an epoch
    (benchmarks/README.md, "GPU (H200)"). Elsewhere the default."""
    return "reduce-overhead" if hw.device.type == "cuda" else None


def data_parallel(training: Training, cfg: TrainConfig, hw: Hardware, group: distributed.Group,
                  first_epoch: int) -> Training:
    """training as one rank of a data-parallel run from first_epoch on: its steps through DDP
    (compiled around DDP, so that torch.compile sees the gradient buckets), its tensor
    augmentation drawn for the whole batch. Built once the model holds its starting weights
    (a resume's), which DDP copies from rank 0 to the others."""
    train_whiten_bias(training.model, whiten_bias_trains(cfg, first_epoch))  # the set DDP registers
    changes = whiten_bias_trains(cfg, first_epoch) != whiten_bias_trains(cfg, cfg.epochs)
    ddp = distributed.wrap(training.model, group, trainable_changes=changes)
    return replace(training, step_model=torch.compile(ddp, mode=compile_mode(hw)) if cfg.compile else ddp,
                   policy=distributed.sharded(training.policy, group.shard), shard=group.shard)


def training_set(data: CifarData, policy: Policy,
                 hw: Hardware) -> tuple[np.ndarray | torch.Tensor, np.ndarray | torch.Tensor]:
    """The uint8 images and labels that batches are cut from: moved once to a GPU when nothing
    is done per image on the CPU, so each batch is cut there; else data's numpy arrays."""
    if hw.device.type == "cuda" and (policy is None or policy.on_device):
        return torch.from_numpy(data.train_x).to(hw.device), torch.from_numpy(data.train_y).to(hw.device)
    return data.train_x, data.train_y


def augment_workers(hw: Hardware) -> int:
    """Processes for a CPU-side (albumentations) policy: when a GPU trains, the cores but one,
    which drives the GPU, up to MAX_AUGMENT_WORKERS; when the CPU trains, none, since its cores
    are the training's. The batches are the same either way (augment.augment_batches)."""
    if hw.device.type != "cuda":
        return 0
    return max(0, min(len(os.sched_getaffinity(0)) - 1, MAX_AUGMENT_WORKERS))


def train_epoch(cfg: TrainConfig, training: Training, scheduler: torch.optim.lr_scheduler.LRScheduler, epoch: int,
                train_set: tuple, data: CifarData, hw: Hardware, progress=None,
                max_steps: int | None = None, workers: int | None = None) -> tuple[float, float]:
    """Epoch `epoch` (counted from 1) of cfg's training, or its first max_steps steps: the
    whitening bias frozen or not and the image size as the epoch wants them, a fresh shuffle.
    workers: processes for a per-image policy, None = augment_workers(hw); the batches are the
    same for any number. Returns (mean training loss, training accuracy), over this process's
    images (a data-parallel rank's part of each batch)."""
    train_whiten_bias(training.model, whiten_bias_trains(cfg, epoch))  # set every epoch: a resume lands anywhere
    epoch_batches = batches.iterate_batches(*train_set, cfg.batch_size, generator=training.generator, drop_last=True,
                                            augment=training.policy,
                                            workers=augment_workers(hw) if workers is None else workers,
                                            shard=training.shard,
                                            flips=epoch_flips(training.policy, len(train_set[1]), cfg.seed, epoch))
    if max_steps is not None:
        epoch_batches = itertools.islice(epoch_batches, max_steps)
    return loop.train_one_epoch(training.step_model, training.optimizer, scheduler, epoch_batches, mean=data.mean,
                                std=data.std, loss_fn=training.loss_fn, hw=hw, augment=training.policy,
                                generator=training.generator, ema=training.ema, size=epoch_size(cfg, epoch),
                                progress=progress)
