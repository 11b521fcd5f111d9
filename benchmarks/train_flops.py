"""The arithmetic of a recipe's training, counted rather than timed: the floating-point
operations of its convolutions and matrix products (torch.utils.flop_counter; a multiply-add is
2), in the forward, the backward and the optimizer step, summed over the recipe's epochs. No
machine's speed enters it, so it compares a GPU recipe with a CPU one, which no timing can:

    python benchmarks/train_flops.py --recipes cpu,fast,reference:custom_resnet --out benchmarks/results/train-flops.json

A recipe may name its model after a colon (the reference recipe names none: main trains it on
custom_resnet) and its epochs after a second one, as a time budget chose them (cpu:fast_net:13):
the recipe's share of them at low resolution, as train takes it.

The model is built by steps.training.start_training as train builds it (the whitening conv frozen,
its bias trained or frozen as each epoch has it, BatchNorm scales frozen where the recipe freezes
them), on synthetic data. One forward and backward at batch --batch is counted per image size and
whitening-bias setting the recipe's epochs use, and divided by the batch; the optimizer step is
counted once a step (Muon's orthogonalisation is matrix products; SGD's update is elementwise and
counts 0). An epoch is train's: floor(--train-images / batch_size) full batches. Left out:
elementwise work (BatchNorm, activations, the EMA, augmentation), so the figures are a lower
bound on what a machine does, and train's test passes, which are not training.
"""

import argparse
import datetime
import json
import platform
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from steps import batches, hardware, whiten  # noqa: E402
from steps.data import load_data, synthetic, write_data  # noqa: E402
from steps.errors import StepError  # noqa: E402
from steps.recipes import RECIPES, TrainConfig, epoch_size, resolve_config, validate, whiten_bias_trains  # noqa: E402
from steps.training import Training, start_training  # noqa: E402

FULL_SIZE = 32
TRAIN_IMAGES = 50_000  # CIFAR-10's training set


def counted(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def step_flops(training: Training, side: int, batch: int) -> tuple[float, int]:
    """(forward + backward FLOPs per image at side x side, optimizer step FLOPs) of one step."""
    model, optimizer = training.model, training.optimizer
    x = torch.randn(batch, 3, side, side)
    labels = torch.arange(batch) % 10
    model.train()
    optimizer.zero_grad(set_to_none=True)
    per_image = counted(lambda: training.loss_fn(model(x), labels).backward()) / batch
    return per_image, counted(optimizer.step)


def forward_flops(training: Training, side: int = FULL_SIZE) -> float:
    """One inference forward of one image: what a served prediction computes."""
    training.model.eval()
    with torch.no_grad():
        return counted(lambda: training.model(torch.zeros(1, 3, side, side)))


def recipe_flops(cfg: TrainConfig, training: Training, train_images: int, batch: int) -> dict:
    steps = batches.num_batches(train_images, cfg.batch_size, drop_last=True)
    kinds: dict[tuple[int, bool], dict] = {}  # (side, whitening bias trains) -> its counts and epochs
    for epoch in range(1, cfg.epochs + 1):
        key = (epoch_size(cfg, epoch) or FULL_SIZE, whiten_bias_trains(cfg, epoch))
        if key not in kinds:
            whiten.train_whiten_bias(training.model, key[1])
            per_image, per_step = step_flops(training, key[0], batch)
            kinds[key] = {"side": key[0], "whiten_bias_trains": key[1], "epochs": [],
                          "gflop_per_image": per_image / 1e9, "gflop_per_optimizer_step": per_step / 1e9}
        kinds[key]["epochs"].append(epoch)
    rows = list(kinds.values())
    for row in rows:
        row["pflop"] = len(row["epochs"]) * steps * (cfg.batch_size * row["gflop_per_image"]
                                                     + row["gflop_per_optimizer_step"]) / 1e6
    return {"model": cfg.model, "epochs": cfg.epochs, "batch_size": cfg.batch_size, "optimizer": cfg.optimizer,
            "steps_per_epoch": steps, "images_trained": cfg.epochs * steps * cfg.batch_size,
            "forward_gflop_per_image": forward_flops(training) / 1e9, "by_epoch_kind": rows,
            "total_pflop": sum(row["pflop"] for row in rows)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", default="cpu,fast", help=f"comma-separated, of {', '.join(RECIPES)}, each with "
                                                          "an optional :model and :epochs (as a time budget "
                                                          "chose them); ratios are to the first")
    p.add_argument("--train-images", type=int, default=TRAIN_IMAGES)
    p.add_argument("--batch", type=int, default=8, help="images in each counted step (the count is per image)")
    p.add_argument("--out", type=Path, default=Path("train_flops.json"))
    args = p.parse_args(argv)

    configs = []
    for spelled in args.recipes.split(","):
        recipe, _, rest = spelled.partition(":")
        model, _, epochs = rest.partition(":")
        try:
            if epochs and not epochs.isdigit():
                raise StepError(f"{spelled!r}: epochs after the second colon are a whole number")
            given = {"model": model or None, "epochs": int(epochs) if epochs else None}
            # compile off: the count runs the plain module; max_lr: any, nothing here is scheduled.
            cfg = replace(resolve_config(recipe, given), compile=False, max_lr=0.1)
            validate(cfg)
        except StepError as exc:  # before any work: the step's one-line message, no traceback
            raise SystemExit(f"error: {exc}") from None
        configs.append((recipe, cfg))

    hw = hardware.Hardware(torch.device("cpu"), None, False)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        write_data(Path(tmp) / "data", *synthetic(n_train=200, n_test=10), source="synthetic")
        data = load_data(str(Path(tmp) / "data"))
        for recipe, cfg in configs:
            row = {"recipe": recipe, **recipe_flops(cfg, start_training(cfg, data, hw), args.train_images, args.batch)}
            row["vs_first"] = row["total_pflop"] / (rows[0]["total_pflop"] if rows else row["total_pflop"])
            rows.append(row)
            print(f"{recipe:10s} {cfg.model:14s} {cfg.epochs:3d} epochs  {row['total_pflop']:8.2f} PFLOP  "
                  f"x{row['vs_first']:.2f} of {rows[0]['recipe']}  (forward {row['forward_gflop_per_image']:.3f} "
                  f"GFLOP an image)", flush=True)
    result = {"benchmark": "train_flops",
              "command": " ".join(["python", "benchmarks/train_flops.py", *(argv or sys.argv[1:])]),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
              "machine": {"platform": platform.platform(), "torch": torch.__version__},
              "train_images": args.train_images, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
