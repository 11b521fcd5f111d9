"""find_lr: an LR range test on the training data, suggesting the max_lr that train uses.

Reads: the `data/` output of download_data (a path or runs:/<run_id>/data). Writes: the test's
settings as params, metric `suggested_lr` (the LR at the steepest descent of the smoothed
loss) and plots/lr_range_test.png (smoothed loss against LR, log axis, suggestion marked).
The model and optimizer are built as train builds them, and restored after the test.
"""

import logging
import tempfile
from pathlib import Path

import click
import mlflow
import torch
from torch import nn

from steps import batches, hardware, lr_range, optim
from steps.artifacts import PLOTS_DIR, SUGGESTED_LR_METRIC
from steps.augment import POLICIES, build_policy, check_aug
from steps.data import CifarData, load_data
from steps.options import WHOLE, log_params
from steps.plots import lr_range_plot
from steps.runtime import step_command

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
    result = lr_range.lr_range_test(
        model, optimizer,
        lambda: batches.iterate_batches(data.train_x, data.train_y, batch_size, generator=generator,
                                       drop_last=True, augment=policy),
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


def find_lr(data_uri: str, model_name: str = "fast_net", *, batch_size: int = 512, optimizer: str = "sgd",
            weight_decay: float = 5e-4, label_smoothing: float = 0.1, aug: str = "reference",
            start_lr: float = START_LR, end_lr: float = END_LR, num_iter: int = NUM_ITER, seed: int = 0,
            device: str = "auto") -> lr_range.RangeTest:
    """Run the range test and log it to the active MLflow run."""
    hw = hardware.hardware(device)
    data = load_data(data_uri)
    log_params({"data": data_uri, "model": model_name, "batch_size": batch_size, "optimizer": optimizer,
                       "weight_decay": weight_decay, "label_smoothing": label_smoothing, "aug": aug,
                       "start_lr": start_lr, "end_lr": end_lr, "num_iter": num_iter, "seed": seed,
                       "data_digest": data.digest})
    mlflow.set_tag("data_digest", data.digest)
    model = hardware.build_model(model_name, seed, hw)
    opt = optim.build_optimizer(optimizer, model, start_lr, weight_decay)
    result = range_test(model, opt, data, batch_size=batch_size, aug=aug, label_smoothing=label_smoothing,
                        seed=seed, hw=hw, start_lr=start_lr, end_lr=end_lr, num_iter=num_iter)
    log_range_test(result, f"{model_name}, {optimizer}")
    return result


@click.command(help=__doc__)
@click.option("--data", "data_uri", required=True, help="download_data's output: a folder or runs:/<run_id>/data.")
@click.option("--model", default="fast_net", show_default=True, help="Architecture name in cifar_models.")
@click.option("--batch-size", default=512, type=WHOLE, show_default=True)
@click.option("--optimizer", default="sgd", show_default=True, help="sgd (Nesterov momentum 0.9), adam, adamw or muon (steps.optim.MuonSGD).")
@click.option("--weight-decay", default=5e-4, show_default=True)
@click.option("--label-smoothing", default=0.1, show_default=True)
@click.option("--aug", default="reference", show_default=True, help=f"Augmentation policy: {', '.join(POLICIES)}.")
@click.option("--start-lr", default=START_LR, show_default=True)
@click.option("--end-lr", default=END_LR, show_default=True)
@click.option("--num-iter", default=NUM_ITER, type=WHOLE, show_default=True, help="Training steps in the sweep.")
@click.option("--seed", default=0, type=WHOLE, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
def cli(data_uri: str, model: str, **options) -> None:
    with step_command():
        find_lr(data_uri, model, **options)


if __name__ == "__main__":
    cli()
