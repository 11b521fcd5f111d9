"""How far a data-parallel train lands from the single process with the same global batch and
seed: the tolerance tests/test_distributed.py allows.

    python benchmarks/data_parallel.py --seeds 5 --out benchmarks/results/data-parallel-cpu-2core.json

For each seed, `python -m steps.train` (what `mlflow run . -e train` runs) trains CONFIG on the
tiny synthetic set SIZES twice: as one process, and as 2 ranks under torchrun on the CPU (gloo),
each training half of every batch of 64. The last epoch's train_loss and test_loss are read
back from the two runs. The order of the images and their augmentations are the single
process's on both (steps.distributed); what differs is BatchNorm, which normalises each rank's
32 images with their own statistics instead of the 64's, and the order of float sums. The
spread of the single process's figures across seeds is the yardstick: a tolerance well inside
it still tells a training on these batches from one on others.
"""

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from mlflow.tracking import MlflowClient  # noqa: E402

from steps.data import synthetic, write_data  # noqa: E402

# The training the test runs: the cpu recipe (whitening, Muon, EMA, flip and translate, its first
# epochs at 24x24) cut to 4 epochs of 8 batches, in float32 so that no bf16 rounding (which only
# some CPUs do) enters the comparison.
CONFIG = {"recipe": "cpu", "epochs": 4, "batch_size": 64, "device": "cpu", "precision": "fp32"}
SIZES = {"n_train": 512, "n_test": 100}
FIGURES = ("train_loss", "test_loss", "test_accuracy")


def train_args(data: Path, seed: int, nproc: int) -> list[str]:
    args = ["--data", str(data), "--seed", str(seed), "--nproc-per-node", str(nproc)]
    for key, value in CONFIG.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args


def last_epoch(client: MlflowClient, run_id: str) -> dict[str, float]:
    metrics = client.get_run(run_id).data.metrics
    return {name: metrics[name] for name in FIGURES}


def run(seed: int, nproc: int, data: Path, tmp: Path) -> dict[str, float]:
    store = f"sqlite:///{tmp / 'mlflow.db'}"
    env = dict(os.environ, MLFLOW_TRACKING_URI=store, CIFAR10_CHECKPOINTS=str(tmp / "checkpoints"),
               PYTHONPATH=str(REPO))
    client = MlflowClient(store)
    before = {r.info.run_id for r in client.search_runs(["0"])}
    subprocess.run([sys.executable, "-m", "steps.train", *train_args(data, seed, nproc)], cwd=tmp, env=env,
                   check=True, capture_output=True)
    [run_id] = {r.info.run_id for r in client.search_runs(["0"])} - before
    return last_epoch(client, run_id)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--out", type=Path, default=Path("data_parallel.json"))
    args = p.parse_args(argv)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_data(tmp / "data", *synthetic(**SIZES), source="synthetic")
        for seed in range(args.seeds):
            single, parallel = (run(seed, nproc, tmp / "data", tmp) for nproc in (1, 2))
            rows.append({"seed": seed, "single": single, "two_ranks": parallel,
                         "difference": {k: parallel[k] - single[k] for k in FIGURES}})
            print(json.dumps(rows[-1]), flush=True)
    result = {
        "what": "last-epoch figures of train as 1 process and as 2 gloo ranks, same global batch and seed",
        "config": CONFIG, "sizes": SIZES, "rows": rows,
        "max_abs_difference": {k: max(abs(r["difference"][k]) for r in rows) for k in FIGURES},
        "single_seed_stdev": {k: statistics.stdev(r["single"][k] for r in rows) for k in FIGURES},
        "date": datetime.date.today().isoformat(), "cpu": _cpu(), "cpus": len(os.sched_getaffinity(0)),
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                 text=True).stdout.strip(),
    }
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("max_abs_difference", "single_seed_stdev")}, indent=1))
    return result


def _cpu() -> str:
    lines = Path("/proc/cpuinfo").read_text().splitlines()
    name = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    flags = next(line for line in lines if line.startswith("flags"))
    return f"{name}{', avx512_bf16' if 'avx512_bf16' in flags.split() else ''}"


if __name__ == "__main__":
    main()
