"""find_lr: an LR range test on the training data, suggesting the max_lr that train uses.

Reads: the `data/` output of download_data (a path or runs:/<run_id>/data). Writes: the test's
settings as params, metric `suggested_lr` (the LR at the steepest descent of the smoothed
loss) and plots/lr_range_test.png (smoothed loss against LR, log axis, suggestion marked).
The network, optimizer, loss and batches are the ones train would use for the same recipe and
options (steps.training.start_training: whitening, BatchNorm settings, the recipe's optimizer
with its parameter groups), so the suggestion is for the training that will use it.
"""

import logging
import tempfile
from dataclasses import asdict
from pathlib import Path

import click
import mlflow
import torch
from torch import nn

from steps import batches, hardware, lr_range
from steps.artifacts import PLOTS_DIR, SUGGESTED_LR_METRIC
from steps.augment import POLICIES, build_policy, check_aug, epoch_flips
from steps.data import CifarData, load_data
from steps.options import WHOLE, OrNotGiven, log_params, recipe_param
from steps.recipes import AUTO, RECIPES, TrainConfig, choose_recipe, resolve_config, validate
from steps.plots import lr_range_plot
from steps.runtime import step_command
from steps.training import start_training

log = logging.getLogger(__name__)

RULE = "steepest descent of smoothed loss"
PLOT_NAME = "lr_range_test.png"

# The sweep: seven decades in a hundred steps, fastai's and torch-lr-finder's usual span.
START_LR = 1e-7
END_LR = 10.0
NUM_ITER = 100


def range_test(model: nn.Module, optimizer: torch.optim.Optimizer, data: CifarData, *, batch_size: int,
               aug: str, label_smoothing: float, seed: int, hw: hardware.Hardware, start_lr: float = START_LR,
               end_lr: float = END_LR, num_iter: int = NUM_ITER) -> lr_range.RangeTest:
    """The range test on data's training set with the training loss and augmentation.

    It draws from its own generator (seeded from `seed`), so running it inside train leaves
    train's own random stream as it would be without it."""
    check_aug(aug)
    generator = torch.Generator().manual_seed(seed + 1)
    policy = build_policy(aug, data.mean)
    flips = epoch_flips(policy, len(data.train_y), seed, 1)  # the test is shorter than an epoch
    result = lr_range.lr_range_test(
        model, optimizer,
        lambda: batches.iterate_batches(data.train_x, data.train_y, batch_size, generator=generator,
                                       drop_last=True, augment=policy, flips=flips),
        mean=data.mean, std=data.std, loss_fn=nn.CrossEntropyLoss(label_smoothing=label_smoothing), hw=hw,
        start_lr=start_lr, end_lr=end_lr, num_iter=num_iter, augment=policy, generator=generator)
    log.info("range test: %d steps from %.3g to %.3g%s; suggested LR %.4g (%s)", len(result.lrs), result.lrs[0],
             result.lrs[-1], " (stopped: loss diverged)" if result.diverged else "", result.suggestion, RULE)
    return result


def log_range_test(result: lr_range.RangeTest, label: str) -> None:
    """The suggestion as metric suggested_lr and the curve as plots/lr_range_test.png."""
    mlflow.log_metric(SUGGESTED_LR_METRIC, result.suggestion)
    with tempfile.TemporaryDirectory() as tmp:
        path = lr_range_plot(result.lrs, result.losses, result.suggestion, Path(tmp) / PLOT_NAME,
                             f"LR range test, {label}: suggestion = {RULE}")
        mlflow.log_artifact(str(path), PLOTS_DIR)


def find_lr(data_uri: str, cfg: TrainConfig, *, start_lr: float = START_LR, end_lr: float = END_LR,
            num_iter: int = NUM_ITER, device: str = "auto", precision: str = "auto",
            recipe: str = "none") -> lr_range.RangeTest:
    """Run the range test on cfg's training setup and log it to the active MLflow run."""
    validate(cfg)
    hw = hardware.hardware(device, precision)
    data = load_data(data_uri)
    log_params({**asdict(cfg), **recipe_param(recipe), "data": data_uri, "start_lr": start_lr, "end_lr": end_lr,
                "num_iter": num_iter, "data_digest": data.digest})
    mlflow.set_tag("data_digest", data.digest)
    training = start_training(cfg, data, hw)
    result = range_test(training.model, training.optimizer, data, batch_size=cfg.batch_size, aug=cfg.aug,
                        label_smoothing=cfg.label_smoothing, seed=cfg.seed, hw=hw, start_lr=start_lr, end_lr=end_lr,
                        num_iter=num_iter)
    log_range_test(result, f"{cfg.model}, {cfg.optimizer}")
    return result


@click.command(help=__doc__)
@click.option("--data", "data_uri", required=True, help="download_data's output: a folder or runs:/<run_id>/data.")
@click.option("--recipe", default=AUTO, show_default=True,
              help=f"train's preset: {', '.join((AUTO, *RECIPES))}; the test runs on its configuration.")
# These default to None, "not given": the recipe's value, as for train.
@click.option("--model", type=OrNotGiven(click.STRING), help="Architecture name in cifar_models; the recipe's when not given.")
@click.option("--batch-size", type=OrNotGiven(WHOLE), help="The recipe's when not given.")
@click.option("--optimizer", type=OrNotGiven(click.STRING),
              help="sgd (Nesterov momentum 0.9), adam, adamw or muon (steps.optim.MuonSGD); the recipe's when not given.")
@click.option("--weight-decay", type=OrNotGiven(click.FLOAT), help="The recipe's when not given.")
@click.option("--label-smoothing", type=OrNotGiven(click.FLOAT), help="The recipe's when not given.")
@click.option("--aug", type=OrNotGiven(click.STRING), help=f"Augmentation policy: {', '.join(POLICIES)}; the recipe's when not given.")
@click.option("--start-lr", default=START_LR, show_default=True)
@click.option("--end-lr", default=END_LR, show_default=True)
@click.option("--num-iter", default=NUM_ITER, type=WHOLE, show_default=True, help="Training steps in the sweep.")
@click.option("--seed", default=0, type=WHOLE, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--precision", default="auto", show_default=True, help="auto, bf16 or fp32, as for train.")
def cli(data_uri: str, recipe: str, start_lr: float, end_lr: float, num_iter: int, device: str, precision: str,
        **given) -> None:
    with step_command():
        chosen, _ = choose_recipe(recipe, device)
        find_lr(data_uri, resolve_config(chosen, given), start_lr=start_lr, end_lr=end_lr, num_iter=num_iter,
                device=device, precision=precision, recipe=chosen)


if __name__ == "__main__":
    cli()
