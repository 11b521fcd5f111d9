"""Training time-to-accuracy of a train recipe, without MLflow: N seeds, medians and means.

The loop is train's (steps.train._train_locked) with the tracking and the checkpoints taken
out: the same steps.training.start_training, schedule and train_epoch. What is timed is the
training itself, from the whitening init to the last optimizer step, with no test pass in
between (train tests after every epoch; this does not, so that the figure is the training's
alone). The data set is loaded and, where train would, moved to the device before the clock
starts. With compile, one throwaway model is trained for a few steps first and that compile
warm-up is reported on its own line (on CUDA each seed's model still records its own CUDA
graphs of the compiled step, inside its time).

Timing: time.perf_counter on a CPU; on CUDA, CUDA events around the loop after a synchronize.
Accuracy: the result network (the EMA's when on) on the test set, plain and with flip and
flip+shift test-time augmentation (cifar_models.inference.predict_logits).

    python benchmarks/train_speed.py --data <download_data output> --recipe fast --seeds 5
    python benchmarks/train_speed.py --data <dir>/cifar-10-python.tar.gz --recipe fast --seeds 5
    python benchmarks/train_speed.py --data <dir> --recipe cpu --seeds 1 --train-limit 2000 --epochs 1

Writes a JSON file (--out) with the machine, the date, the command, the resolved config and
every seed's figures.
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import urllib.parse
from dataclasses import asdict, replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: benchmarks/ is on sys.path, the repository not
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from steps import batches, budget, hardware, loop, optim, schedules  # noqa: E402
from steps.artifacts import MANIFEST  # noqa: E402
from steps.augment import POLICIES, build_policy  # noqa: E402
from steps.data import CifarData, load_data, local_path, read_cifar, validation_split, write_data  # noqa: E402
from steps.errors import StepError  # noqa: E402
from steps.recipes import RECIPES, TrainConfig, resolve_config, validate  # noqa: E402
from steps.training import EVAL_BATCH, augment_workers, start_training, train_epoch, training_set  # noqa: E402

FLAG = {None: None, "true": True, "false": False}  # a true/false option, or not given
WARMUP_STEPS = 5  # compile warm-up: enough steps to compile the training step's graphs


class Clock:
    """Seconds between start() and stop(): CUDA events on a GPU (the device's own time,
    after a synchronize), time.perf_counter on a CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self.begin, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.begin.record()
        else:
            self.begin = time.perf_counter()

    def stop(self) -> float:
        if self.cuda:
            self.end.record()
            torch.cuda.synchronize()
            return self.begin.elapsed_time(self.end) / 1000
        return time.perf_counter() - self.begin


def train_seed(cfg: TrainConfig, data: CifarData, hw: hardware.Hardware, train_set: tuple,
               max_steps: int | None = None, workers: int | None = None) -> tuple[nn.Module, budget.Fit | None]:
    """train's loop for cfg (max_lr must be set), untracked; returns the result network and,
    with a time budget, how its epochs were chosen (as train chooses them, on the timing of
    this run's own steps, which the clock includes). workers: augmentation processes, None =
    as train takes them (training.augment_workers)."""
    training = start_training(cfg, data, hw)
    fit = None
    if cfg.time_budget:
        cfg, fit = budget.fit_budget(cfg, training, train_set, data, hw, spent=0.0)
    steps_per_epoch = batches.num_batches(len(data.train_y), cfg.batch_size, drop_last=True)
    scheduler = schedules.lambda_scheduler(
        training.optimizer, schedules.SCHEDULES[cfg.schedule](cfg, cfg.max_lr, cfg.epochs * steps_per_epoch))
    for epoch in range(1, cfg.epochs + 1):
        train_epoch(cfg, training, scheduler, epoch, train_set, data, hw, max_steps=max_steps, workers=workers)
        if max_steps is not None:
            break
    return training.result, fit


def read_data(uri: str, val_size: int = 0) -> CifarData:
    """download_data's output (a folder, or a runs:/ or other artifact URI), or a python-version
    CIFAR-10 archive (the .tar.gz or its extracted folder, as a path or file:// URL) read as
    download_data reads its source. The archive needs no MLflow, which a GPU machine may not
    have: only torch and numpy are imported on this path. Its arrays go through write_data and
    load_data, so they get the same manifest and checks."""
    scheme = urllib.parse.urlparse(uri).scheme
    if len(scheme) > 1 and scheme != "file":  # runs:/, s3:// ...; one letter is a Windows drive
        return load_data(uri)
    path = local_path(uri)
    if (path / MANIFEST).is_file():
        return load_data(str(path))
    train_x, train_y, test_x, test_y = read_cifar(path)
    train_x, train_y, val_x, val_y = validation_split(train_x, train_y, val_size)
    with tempfile.TemporaryDirectory() as tmp:
        write_data(Path(tmp) / "data", train_x, train_y, test_x, test_y, source=str(path),
                   val=(val_x, val_y) if val_size else None)
        return load_data(str(Path(tmp) / "data"))


def machine(hw: hardware.Hardware) -> dict:
    info = {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "device": str(hw.device),
            "autocast": str(hw.autocast), "channels_last": hw.channels_last}
    if hw.device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(hw.device)
    return info


def run(args: argparse.Namespace) -> dict:
    hw = hardware.hardware(args.device, args.precision)
    data = read_data(args.data, args.val_size)
    if args.train_limit:
        data = replace(data, train_x=data.train_x[:args.train_limit], train_y=data.train_y[:args.train_limit])
    if args.test_limit:
        data = replace(data, test_x=data.test_x[:args.test_limit], test_y=data.test_y[:args.test_limit])
    given = {"model": args.model, "epochs": args.epochs, "batch_size": args.batch_size, "max_lr": args.max_lr,
             "optimizer": args.optimizer, "aug": args.aug, "low_res": args.low_res, "low_res_pct": args.low_res_pct,
             "whiten_bias_epochs": args.whiten_bias_epochs, "bn_bias_lr": args.bn_bias_lr,
             "freeze_bn_scale": FLAG[args.freeze_bn_scale], "dirac": FLAG[args.dirac], "compile": FLAG[args.compile],
             "label_smoothing": args.label_smoothing, "ema": args.ema, "pct_start": args.pct_start,
             "weight_decay": args.weight_decay, "time_budget": args.time_budget}
    base = resolve_config(args.recipe, given)
    validate(base)
    if base.max_lr <= 0:
        raise SystemExit("this benchmark needs a fixed --max-lr (the recipe's is 0: a range test)")
    if args.augment_workers is not None and args.augment_workers < 0:
        raise SystemExit(f"--augment-workers must be 0 or more, got {args.augment_workers}")
    train_set = training_set(data, build_policy(base.aug, data.mean), hw)
    workers = augment_workers(hw) if args.augment_workers is None else args.augment_workers
    clock = Clock(hw.device)

    warmup_s = None
    if base.compile:
        clock.start()
        train_seed(replace(base, seed=args.first_seed + 10_000), data, hw, train_set, max_steps=WARMUP_STEPS,
                   workers=workers)
        warmup_s = clock.stop()
        print(f"compile warm-up: {warmup_s:.2f} s ({WARMUP_STEPS} steps of a throwaway model)", flush=True)

    seeds = []
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        cfg = replace(base, seed=seed)
        clock.start()
        net, fit = train_seed(cfg, data, hw, train_set, workers=workers)
        seconds = clock.stop()
        row = {"seed": seed, "train_seconds": seconds}
        if fit is not None:
            row.update(epochs=fit.epochs, low_res_epochs=fit.low_res_epochs, budget_choice=fit.reason(cfg.time_budget))
        if len(data.val_y):  # the split to choose settings on, so the test set stays unseen by the choice
            row["val_accuracy"] = loop.evaluate(net, data.val_x, data.val_y, data.mean, data.std,
                                                batch_size=EVAL_BATCH)[1]
        for tta, key in (("none", "test_accuracy"), ("flip", "test_accuracy_flip_tta"),
                         ("flip_shift", "test_accuracy_tta")):
            row[key] = loop.evaluate(net, data.test_x, data.test_y, data.mean, data.std,
                                       batch_size=EVAL_BATCH, tta=tta)[1]
        seeds.append(row)
        extra = (f", {fit.epochs} epochs" if fit else "") + (
            f", val accuracy {row['val_accuracy']:.4f}" if "val_accuracy" in row else "")
        print(f"seed {seed}: {seconds:.2f} s{extra}, test accuracy {row['test_accuracy']:.4f} "
              f"(flip {row['test_accuracy_flip_tta']:.4f}, flip+shift {row['test_accuracy_tta']:.4f})", flush=True)

    summary = {}
    for key in ("train_seconds", "test_accuracy", "test_accuracy_flip_tta", "test_accuracy_tta", "val_accuracy",
                "epochs"):
        values = [row[key] for row in seeds if key in row]
        if not values:
            continue
        summary[key] = {"median": statistics.median(values), "mean": statistics.fmean(values),
                        "min": min(values), "max": max(values)}
    print(f"{len(seeds)} seed(s), {args.recipe} recipe on {hw.device}: training median "
          f"{summary['train_seconds']['median']:.2f} s, test accuracy mean {summary['test_accuracy']['mean']:.4f} "
          f"(flip {summary['test_accuracy_flip_tta']['mean']:.4f}, flip+shift {summary['test_accuracy_tta']['mean']:.4f})")
    return {"benchmark": "train_speed", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "machine": machine(hw),
            "recipe": args.recipe, "config": asdict(base), "data": {"uri": args.data, "digest": data.digest,
            "source": data.source, "train_size": len(data.train_y), "test_size": len(data.test_y)},
            "augment_workers": workers, "compile_warmup_seconds": warmup_s, "seeds": seeds, "summary": summary}


def budget_seconds(text: str) -> float:
    try:
        return budget.parse_seconds(text)
    except StepError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True,
                   help="download_data's output (folder or runs:/ URI), or a cifar-10-python.tar.gz or its folder")
    p.add_argument("--recipe", default="fast", choices=[r for r in RECIPES if r != "custom"])
    p.add_argument("--seeds", type=int, default=5, help="number of seeds, from --first-seed")
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--model", help="override the recipe's")
    p.add_argument("--epochs", type=int, help="override the recipe's")
    p.add_argument("--batch-size", type=int, help="override the recipe's")
    p.add_argument("--max-lr", type=float, help="override the recipe's")
    p.add_argument("--optimizer", choices=sorted(optim.OPTIMIZERS), help="override the recipe's")
    p.add_argument("--aug", choices=sorted(POLICIES), help="override the recipe's")
    p.add_argument("--compile", choices=["true", "false"], help="override the recipe's")
    p.add_argument("--low-res", type=int, help="override the recipe's (0 = full size throughout)")
    p.add_argument("--low-res-pct", type=float, help="override the recipe's")
    p.add_argument("--whiten-bias-epochs", type=int, help="override the recipe's (0 = the bias trains throughout)")
    p.add_argument("--freeze-bn-scale", choices=["true", "false"], help="override the recipe's")
    p.add_argument("--dirac", choices=["true", "false"], help="override the recipe's (conv filters start as the identity)")
    p.add_argument("--bn-bias-lr", type=float, help="override the recipe's (the BatchNorm biases' LR multiple, sgd)")
    p.add_argument("--label-smoothing", type=float, help="override the recipe's")
    p.add_argument("--ema", type=float, help="override the recipe's (per-step decay, 0 = off)")
    p.add_argument("--pct-start", type=float, help="override the recipe's (share of the steps warming up)")
    p.add_argument("--weight-decay", type=float, help="override the recipe's")
    p.add_argument("--time-budget", type=budget_seconds, help="seconds (or 90s, 15m) for each seed's training: "
                   "the epochs that fit are chosen as train chooses them (do not give --epochs with it)")
    p.add_argument("--val-size", type=int, default=0,
                   help="training images held out, class-balanced as download_data does, to choose settings on")
    p.add_argument("--augment-workers", type=int,
                   help="processes for a per-image (albumentations) policy; train's choice unless given")
    p.add_argument("--train-limit", type=int, default=0, help="first N training images only (smoke runs)")
    p.add_argument("--test-limit", type=int, default=0, help="first N test images only (smoke runs)")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto")
    p.add_argument("--out", type=Path, default=Path("train_speed.json"), help="where the JSON goes")
    return p


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    try:
        result = {"command": " ".join(["python", "benchmarks/train_speed.py", *argv]), **run(args)}
    except StepError as exc:  # bad data or config: the step's one-line message, no traceback
        raise SystemExit(f"error: {exc}") from None
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
