"""The train step's config and its recipes, as data, with no MLflow and no training objects in
them: train, main and the benchmarks (which run where only torch is installed, as on a GPU
machine) share them.

Recipes: --recipe names a preset of TrainConfig values (RECIPES), each with its model:
`reference` (custom_resnet, the ResNet-9 recipe: one-cycle, 24 epochs, per-image
albumentations), `fast` (fast_net, for a GPU: data and augmentation on the device, whitening,
EMA, compiled) and `cpu` (fast_net_small within ~15 minutes on a 2-core CPU). `auto`, the
default, is `fast` where a CUDA device trains and `cpu` elsewhere (choose_recipe). A recipe's
values replace TrainConfig's defaults; an option given explicitly still wins over the recipe.
An option left out, or given as `recipe` (MLproject's default for every recipe-overridable
parameter), is "not given", so `mlflow run . -e train -P recipe=cpu -P epochs=6` is the cpu
recipe with 6 epochs.
"""

import logging
import math
from dataclasses import dataclass

import torch

from cifar_models.registry import create_model, list_models
from steps.augment import check_aug
from steps.errors import StepError
from steps.optim import OPTIMIZERS
from steps.schedules import SCHEDULES

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    model: str = "fast_net"  # architecture name in the cifar_models registry
    epochs: int = 24  # passes over the training set
    batch_size: int = 512  # images per optimizer step; the last partial batch of an epoch is dropped
    max_lr: float = 0.0  # peak LR of the schedule; 0 = lr_run's suggested_lr, or a range test in this run
    lr_run: str = ""  # find_lr run ID whose suggested_lr is the peak LR when max_lr is 0
    optimizer: str = "sgd"  # sgd (Nesterov momentum 0.9), adam, adamw, or muon (Muon on the conv filters)
    weight_decay: float = 5e-4  # L2 penalty (sgd, adam) or decoupled decay per unit LR (adamw)
    label_smoothing: float = 0.1  # weight moved from the true class to all classes in the training loss
    aug: str = "reference"  # augmentation policy, a name in steps.augment.POLICIES
    schedule: str = "one_cycle"  # one_cycle, or warmup_linear (from 0 up to max_lr, then linearly to 0)
    pct_start: float = 5 / 24  # fraction of all steps spent rising to max_lr (the reference: epoch 5 of 24)
    div_factor: float = 25.0  # one_cycle starts at max_lr / div_factor
    final_div_factor: float = 1e4  # one_cycle ends at max_lr / final_div_factor
    seed: int = 0  # initial weights, shuffling and augmentation
    whiten: bool = False  # first conv set to the patch whitening of WHITEN_IMAGES training images, frozen
    dirac: bool = False  # every conv's first in_channels filters start as the identity (steps.dirac)
    ema: float = 0.0  # per-step decay of an EMA of the weights (0 = off); when on, test metrics and weights are the EMA's
    compile: bool = False  # torch.compile the training forward/backward (pays on CUDA; slow warm-up on a CPU)
    low_res: int = 0  # side (pixels) the training images are downscaled to in the first epochs; 0 = never
    low_res_pct: float = 0.0  # fraction of the epochs (rounded down, so never the last) trained at low_res
    whiten_bias_epochs: int = 0  # epochs the whitening conv's bias trains before it is frozen too; 0 = all
    freeze_bn_scale: bool = False  # BatchNorm scales fixed at 1 (optim.freeze_bn_scales); their biases train
    bn_bias_lr: float = 1.0  # the BatchNorm biases' LR as a multiple of the schedule's (sgd only), same decay per step
    test_every: int = 1  # train's test pass runs after every test_every-th epoch and after the last (1 = each epoch)
    time_budget: float = 0.0  # seconds for the training; > 0: epochs are chosen to fit it (steps.budget), 0 = off


# Presets of TrainConfig fields (fields not named keep TrainConfig's defaults). SGD is always
# Nesterov with momentum 0.9, the loss a mean over the batch, weight decay coupled (L2): the
# conventions of David Page's ResNet-9 recipe, whose peak LR 0.4 at batch 512 the fast ones
# start from. In these units airbench94's peak is about 1.5 at batch 1024 (its 11.5 per 1024
# examples over a summed loss, momentum 0.85) and its decay per step about 5x ours (0.002 of
# the weights at the peak, against 0.8 x 5e-4), with its BatchNorm scales frozen.
RECIPES: dict[str, dict[str, object]] = {
    # The ResNet-9 reference recipe, spelled out: one-cycle to the peak at epoch 5 of 24,
    # per-image albumentations, peak LR from a range test (max_lr 0).
    "reference": {"model": "custom_resnet", "epochs": 24, "batch_size": 512, "max_lr": 0.0, "optimizer": "sgd", "weight_decay": 5e-4,
                  "label_smoothing": 0.1, "aug": "reference", "schedule": "one_cycle", "pct_start": 5 / 24,
                  "div_factor": 25.0, "final_div_factor": 1e4, "whiten": False, "ema": 0.0, "compile": False,
                  "low_res": 0, "low_res_pct": 0.0, "whiten_bias_epochs": 0, "freeze_bn_scale": False,
                  "bn_bias_lr": 1.0, "test_every": 1},
    # For a GPU, aiming at 4 s on an H200: airbench94's recipe (flip and translate on the
    # device, no cutout; warm-up then linear decay; label smoothing 0.2; a whitened, frozen
    # first conv; an EMA over about an epoch; BatchNorm scales frozen and biases at 64x the LR),
    # compiled. 15 epochs rather than airbench's 10 because they test higher and still fit, and
    # a test pass only every 5th epoch because each is a sizeable share of so short an epoch
    # (benchmarks/README.md, "GPU (H200)").
    "fast": {"model": "fast_net", "epochs": 15, "batch_size": 1024, "max_lr": 0.8, "optimizer": "sgd",
             "weight_decay": 5e-4, "label_smoothing": 0.2, "aug": "flip_translate", "schedule": "warmup_linear",
             "pct_start": 0.2, "whiten": True, "ema": 0.98, "compile": True, "freeze_bn_scale": True,
             "bn_bias_lr": 64.0, "test_every": 5},
    # For a 2-core CPU: just under 15 minutes of training on an AVX2-only one. fast_net_small,
    # at about a third of fast_net's step cost, fits nine epochs when the first five are
    # downscaled to 24x24 (progressive resizing); batch 128 at peak LR 0.3, since in so few
    # epochs more, smaller steps learn more; translate without cutout and airbench94's
    # alternating flip, label smoothing 0.05 and the block convs started as the identity
    # (dirac, as airbench; all three chosen on a held-out split of the lossless copy); whitening
    # and a warmed-up EMA as in `fast`, but the whitening bias trains throughout; Muon on the
    # conv filters, which tests higher than SGD for a little more time per step; no compile,
    # whose warm-up on a CPU takes minutes (benchmarks/README.md, "CPU recipe"). On a CPU with
    # native bf16 a step is much faster: give more epochs, a time budget, or fast_net, there.
    "cpu": {"model": "fast_net_small", "epochs": 9, "batch_size": 128, "max_lr": 0.3, "optimizer": "muon",
            "weight_decay": 5e-4, "label_smoothing": 0.05, "aug": "altflip_translate", "schedule": "warmup_linear",
            "pct_start": 0.25, "whiten": True, "dirac": True, "ema": 0.99, "compile": False, "low_res": 24, "low_res_pct": 5 / 9},
}


AUTO = "auto"  # the recipe that fits the device: choose_recipe
# Recipes made for a GPU: on a CPU they take hours (fast compiles its step, reference trains a
# 6.5M-parameter network for 24 epochs), so train and main warn before they start there.
GPU_RECIPES = ("fast", "reference")


def _preset(recipe: str) -> dict[str, object]:
    try:
        return RECIPES[recipe]
    except KeyError:
        raise StepError(f"unknown recipe {recipe!r}; known: {', '.join((AUTO, *RECIPES))}") from None


def choose_recipe(recipe: str, device: str = "auto") -> tuple[str, str]:
    """(the recipe to train, why): a named one as it is; for auto, `fast` when training runs on
    CUDA (device auto and a CUDA device present, or device cuda) and `cpu` otherwise, said in the
    log of every step that chooses."""
    if recipe != AUTO:
        _preset(recipe)
        return recipe, f"named: {recipe}"
    if device == "auto":
        cuda = torch.cuda.is_available()
        why = "a CUDA device is present" if cuda else "no CUDA device: torch.cuda.is_available() is False"
    else:
        cuda = device.startswith("cuda")
        why = f"device {device}"
    chosen = "fast" if cuda else "cpu"
    log.info("recipe %s -> %s (%s)", AUTO, chosen, why)
    return chosen, why


def recipe_model(recipe: str) -> str:
    """The architecture a recipe is made for."""
    return str(_preset(recipe).get("model", TrainConfig.model))


def gpu_warning(recipe: str, device_type: str) -> str | None:
    """A line to warn with before a GPU recipe starts on a CPU, else None."""
    if recipe in GPU_RECIPES and device_type != "cuda":
        return (f"recipe {recipe} is made for a GPU and takes hours on this CPU; -P recipe=cpu (or auto) "
                "is the one for a CPU")
    return None


def resolve_config(recipe: str, given: dict[str, object]) -> TrainConfig:
    """TrainConfig from the recipe's values, overridden by every option in `given` that is not
    None (None = not given). Unknown field names are a programming error, not a user's."""
    if given.get("time_budget") and given.get("epochs") is not None:
        raise StepError("give epochs or a time budget, not both: with a budget the epochs that fit are chosen")
    return TrainConfig(**{**_preset(recipe), **{k: v for k, v in given.items() if v is not None}})


def validate(cfg: TrainConfig) -> None:
    if cfg.model not in list_models():
        raise StepError(f"unknown model {cfg.model!r}; known models: {', '.join(list_models())}")
    check_aug(cfg.aug)
    if cfg.optimizer not in OPTIMIZERS:
        raise StepError(f"unknown optimizer {cfg.optimizer!r}; known: {', '.join(OPTIMIZERS)}")
    if cfg.schedule not in SCHEDULES:
        raise StepError(f"unknown schedule {cfg.schedule!r}; known: {', '.join(SCHEDULES)}")
    if cfg.epochs < 1 or cfg.batch_size < 1 or cfg.max_lr < 0 or not 0 <= cfg.pct_start <= 1:
        raise StepError(f"need epochs >= 1, batch_size >= 1, max_lr >= 0 and 0 <= pct_start <= 1; got {cfg}")
    if not 0 <= cfg.ema < 1:
        raise StepError(f"ema is a per-step decay in [0, 1), 0 = off; got {cfg.ema}")
    if not 0 <= cfg.low_res <= 32:
        raise StepError(f"low_res is a side of at most 32 pixels, or 0 = off; got {cfg.low_res}")
    if not 0 <= cfg.low_res_pct < 1:
        raise StepError(f"low_res_pct is a fraction of the epochs in [0, 1); got {cfg.low_res_pct}")
    if cfg.bn_bias_lr <= 0:
        raise StepError(f"bn_bias_lr is a positive multiple of the LR; got {cfg.bn_bias_lr}")
    if cfg.bn_bias_lr != 1 and cfg.optimizer != "sgd":
        raise StepError(f"bn_bias_lr other than 1 needs optimizer sgd, not {cfg.optimizer!r}")
    if cfg.test_every < 1:
        raise StepError(f"test_every is a number of epochs >= 1 (1 = a test pass after each); got {cfg.test_every}")
    if not 0 <= cfg.time_budget < math.inf:
        raise StepError(f"time_budget is a number of seconds, 0 = off; got {cfg.time_budget}")
    if cfg.whiten_bias_epochs < 0:
        raise StepError(f"whiten_bias_epochs is a number of epochs, 0 = the bias trains throughout; got {cfg.whiten_bias_epochs}")
    if cfg.low_res:
        check_takes_side(cfg.model, cfg.low_res)


def check_takes_side(model: str, side: int) -> None:
    """Refuse, before any work, a low_res the model's pooling cannot take: custom_resnet's
    final 4x4 max-pool needs the full 32x32, fast_net's three 2x2 pools at least 9x9. One
    forward of one image on the CPU settles it for any architecture."""
    try:
        with torch.no_grad():
            create_model(model).eval()(torch.zeros(1, 3, side, side))
    except RuntimeError:
        raise StepError(f"{model} cannot take {side}x{side} images; give a larger low_res, or 0 = off") from None


def epoch_size(cfg: TrainConfig, epoch: int) -> int | None:
    """The side the training images of `epoch` (counted from 1) are downscaled to, or None to
    keep them as they are: progressive resizing. The first floor(low_res_pct * epochs) epochs
    train at low_res, where a step costs about (low_res / 32)^2 of one at full size, and the
    rest at full size, so that the BatchNorm statistics and the last steps match the test images."""
    low_epochs = math.floor(cfg.low_res_pct * cfg.epochs + 1e-9)  # 5/9 of 9 epochs is 5, float or not
    return cfg.low_res if cfg.low_res and epoch <= low_epochs else None


def tests_after(cfg: TrainConfig, epoch: int) -> bool:
    """Whether train runs its test pass after `epoch` (counted from 1): after every
    test_every-th epoch and always after the last, so a run's last test metrics are those of
    the weights it logs."""
    return epoch % cfg.test_every == 0 or epoch == cfg.epochs


def whiten_bias_trains(cfg: TrainConfig, epoch: int) -> bool:
    """Whether the whitening conv's bias trains in `epoch` (counted from 1): in the first
    whiten_bias_epochs, or in all of them when that is 0 or the conv is not whitened (an
    ordinary conv, whose weights train anyway)."""
    return not cfg.whiten or not cfg.whiten_bias_epochs or epoch <= cfg.whiten_bias_epochs
