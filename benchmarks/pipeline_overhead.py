"""What the MLflow Projects machinery costs: `mlflow run .` of a tiny synthetic pipeline against
the same steps called as plain functions in one Python process, plus download_data on a real
archive.

    .venv/bin/python benchmarks/pipeline_overhead.py --repeats 3 \\
        --archive /tmp/cifar/cifar-10-python.tar.gz --out benchmarks/results/pipeline-cpu-2core.json

1. `mlflow run . --env-manager local` of `main` on synthetic data (fast_net, a fixed max_lr so
   there is no find_lr, 1 epoch, 200 training and 100 test images): download_data, train and
   evaluate each start a Python process of their own, and main registers the result.
2. In one process: the same download_data, train and evaluate functions, each in its own
   MLflow run on a store of its own, then the same registration. The difference is what the
   process-per-step design costs (interpreter and library start-up, project resolution).
3. With --archive: `mlflow run . -e download_data` on the full 60,000-image archive.

Each is repeated --repeats times in a fresh scratch folder with a fresh SQLite store; the
median wall time is reported, and the ratio is taken per repeat before the median.
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

TINY = {"source": "synthetic", "models": "fast_net", "epochs": "1", "batch_size": "64", "max_lr": "0.05",
        "train_limit": "200", "test_limit": "100", "aug": "tensor"}


def env_for(scratch: Path) -> dict[str, str]:
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{scratch / 'mlflow.db'}",
               CIFAR10_CHECKPOINTS=str(scratch / "checkpoints"))
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    return env


def timed_subprocess(cmd: list[str], scratch: Path) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=scratch, env=env_for(scratch), capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return elapsed


def mlflow_run_main(scratch: Path) -> float:
    cmd = [str(Path(sys.executable).parent / "mlflow"), "run", str(REPO), "--env-manager", "local"]
    for key, value in TINY.items():
        cmd += ["-P", f"{key}={value}"]
    return timed_subprocess(cmd, scratch)


IN_PROCESS = """
import sys, time
start = time.perf_counter()
import mlflow
from steps.main import PipelineConfig, run_pipeline
cfg = PipelineConfig(source="synthetic", models=("fast_net",), epochs=1, batch_size=64, max_lr=0.05,
                     train_limit=200, test_limit=100, aug="tensor")
# run_pipeline starts each step with mlflow.projects.run; here the same step functions are
# called directly instead, each in a nested run, to time the pipeline without the processes.
from steps import main as M
from steps.download_data import download_data
from steps.recipes import TrainConfig
from steps.train import train
from steps.evaluate import evaluate

def run_step(entry_point, params, cfg, code):
    with mlflow.start_run(nested=True) as run:
        if entry_point == "download_data":
            download_data(params["source"], int(params["train_limit"]), int(params["test_limit"]))
        elif entry_point == "train":
            train(TrainConfig(model=params["model"], epochs=int(params["epochs"]), batch_size=int(params["batch_size"]),
                              max_lr=float(params["max_lr"]), aug=params["aug"], seed=int(params["seed"])), params["data"])
        elif entry_point == "evaluate":
            evaluate(params["model_uri"], params["data"])
        mlflow.set_tags({"mlflow.project.entryPoint": entry_point, M.CODE_TAG: code})
        return run.info.run_id

M.run_step = run_step
with mlflow.start_run():
    run_pipeline(cfg)
print(time.perf_counter() - start)
"""


def in_process_main(scratch: Path) -> float:
    # A fresh interpreter, so that its library start-up is counted once, as in one process.
    return timed_subprocess([sys.executable, "-c", IN_PROCESS], scratch)


def download_full(scratch: Path, archive: str) -> float:
    cmd = [str(Path(sys.executable).parent / "mlflow"), "run", str(REPO), "-e", "download_data",
           "--env-manager", "local", "-P", f"source={archive}"]
    return timed_subprocess(cmd, scratch)


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--archive", help="a cifar-10-python.tar.gz to time download_data on")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()

    rows = []
    for i in range(args.repeats):
        row = {}
        with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
            row["mlflow_run_s"] = mlflow_run_main(Path(a))
            row["in_process_s"] = in_process_main(Path(b))
        row["ratio"] = row["mlflow_run_s"] / row["in_process_s"]
        if args.archive:
            with tempfile.TemporaryDirectory() as c:
                row["download_data_full_s"] = download_full(Path(c), args.archive)
        print(f"repeat {i + 1}: " + ", ".join(f"{k} {v:.2f}" for k, v in row.items()), flush=True)
        rows.append(row)
    medians = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    import torch

    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(),
                    "python": platform.python_version(), "torch": torch.__version__},
        "repeats": rows,
        "median": medians,
    }
    print("median: " + ", ".join(f"{k} {v:.2f}" for k, v in medians.items()))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
