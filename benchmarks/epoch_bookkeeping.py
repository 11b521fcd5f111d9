"""What train does after each epoch besides training, timed piece by piece: the test pass, a
checkpoint of the training state, and the epoch's metrics written to a SQLite tracking store,
synchronously or queued for MLflow's background thread as train queues them
(steps.train.log_metrics_queued). On a CPU, where an epoch takes minutes, none of it shows; in
the fast recipe's GPU epochs of a fraction of a second, each is a share of the epoch.

    python benchmarks/epoch_bookkeeping.py --recipe fast --repeats 15

The state is the recipe's model, optimizer (after two training steps, so its momentum buffers
exist), schedule and EMA, built on synthetic data by steps.training.start_training and written by
train's own steps.train.training_state and checkpoints.save_checkpoint (fsynced) to a temporary
folder; each metric write is the five epoch metrics at a new step. Compile is off: it changes
nothing here and its warm-up takes minutes on a CPU. Medians over --repeats, time.perf_counter
(on CUDA the test pass ends with its logits on the CPU, so it is waited for).
"""

import argparse
import datetime
import json
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import mlflow  # noqa: E402

from benchmarks.train_speed import machine  # noqa: E402
from steps import checkpoints, hardware, loop, schedules  # noqa: E402
from steps.data import load_data, synthetic, write_data  # noqa: E402
from steps.recipes import RECIPES, resolve_config  # noqa: E402
from steps.train import EPOCH_METRICS, log_metrics_queued, training_state  # noqa: E402
from steps.training import EVAL_BATCH, start_training, train_epoch, training_set  # noqa: E402


def timed(fn) -> float:
    began = time.perf_counter()
    fn()
    return time.perf_counter() - began


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="fast", help=f"one of {', '.join(RECIPES)}")
    p.add_argument("--model", default=None, help="the recipe's unless given")
    p.add_argument("--test-images", type=int, default=10_000, help="size of the test pass (CIFAR-10's test set: 10,000)")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto")
    p.add_argument("--out", type=Path, default=Path("epoch_bookkeeping.json"))
    args = p.parse_args(argv)

    hw = hardware.hardware(args.device, args.precision)
    cfg = replace(resolve_config(args.recipe, {"model": args.model}), compile=False, max_lr=0.1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_data(tmp / "data", *synthetic(n_train=2 * cfg.batch_size, n_test=args.test_images), source="synthetic")
        data = load_data(str(tmp / "data"))
        training = start_training(cfg, data, hw)
        scheduler = schedules.lambda_scheduler(training.optimizer, schedules.SCHEDULES[cfg.schedule](cfg, cfg.max_lr, 100))
        train_epoch(cfg, training, scheduler, 1, training_set(data, training.policy, hw), data, hw, max_steps=2)

        checkpoint = tmp / "checkpoints" / "last.pt"
        values = dict.fromkeys(EPOCH_METRICS, 0.5)
        rows = {"test_pass": [], "checkpoint": [], "metrics_synchronous": [], "metrics_queued": []}
        settles = []
        mlflow.set_tracking_uri(f"sqlite:///{tmp / 'mlflow.db'}")
        with mlflow.start_run():
            for i in range(args.repeats):
                rows["test_pass"].append(timed(lambda: loop.evaluate(
                    training.result, data.test_x, data.test_y, data.mean, data.std, batch_size=EVAL_BATCH)))
                rows["checkpoint"].append(timed(lambda: checkpoints.save_checkpoint(
                    checkpoint, {"epoch": i, **training_state(training, scheduler)})))
                rows["metrics_synchronous"].append(timed(lambda: mlflow.log_metrics(values, step=2 * i,
                                                                                   synchronous=True)))
                rows["metrics_queued"].append(timed(lambda: settles.append(log_metrics_queued(values, 2 * i + 1))))
            settle_s = timed(lambda: [settle() for settle in settles])
        checkpoint_mb = checkpoint.stat().st_size / 1e6

    medians_ms = {name: 1000 * statistics.median(times) for name, times in rows.items()}
    for name, ms in medians_ms.items():
        print(f"{name:20s} {ms:9.2f} ms  (median of {args.repeats})")
    print(f"checkpoint size {checkpoint_mb:.1f} MB; waiting for the {args.repeats} queued writes at the end: "
          f"{1000 * settle_s:.1f} ms")
    result = {"benchmark": "epoch_bookkeeping",
              "command": " ".join(["python", "benchmarks/epoch_bookkeeping.py", *(argv or sys.argv[1:])]),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(), "machine": machine(hw),
              "recipe": args.recipe, "model": cfg.model, "test_images": args.test_images, "repeats": args.repeats,
              "median_ms": medians_ms, "checkpoint_mb": checkpoint_mb, "settle_all_ms": 1000 * settle_s,
              "seconds": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
