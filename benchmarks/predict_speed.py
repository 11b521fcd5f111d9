"""predict's images/s against the raw in-process pyfunc `predict` of the same model on the same
images, in the same run.

    python benchmarks/predict_speed.py --images 3000 --repeats 5 --out benchmarks/results/predict-speed-cpu-2core.json

A model (fast_net_small with random weights by default: speed does not depend on what the
weights learned) is logged with log_pyfunc_model into a SQLite store in a scratch folder, and
--images PNGs of noise (32x32, as CIFAR images are) are written to a folder there. Each repeat
times, back to back (the host may be shared; see the spread of the repeats):
1. raw, before and after the step (their mean): the loaded pyfunc's `predict` on DataFrames of MAX_IMAGES PNG byte strings already in
   memory (decode + preprocess + forward + result frame), what any client of the model pays;
2. step, between the two: steps.predict.predict on the folder, its own images_per_second (reading the files,
   predicting, writing the Parquet table; the model load and the artifact upload are not in it).
The ratio step/raw is taken per repeat, and the median of each is reported.
"""

import argparse
import datetime
import io
import json
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

import mlflow  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import cifar_models  # noqa: E402,F401  (registers the architectures)
from benchmarks import _server  # noqa: E402
from cifar_models.inference import ModelSpec, save_network  # noqa: E402
from cifar_models.preprocess import CIFAR10_MEAN, CIFAR10_STD  # noqa: E402
from cifar_models.pyfunc import INPUT_COLUMN, MAX_IMAGES  # noqa: E402
from cifar_models.registry import create_model  # noqa: E402
from steps.predict import predict  # noqa: E402


def write_pngs(folder: Path, count: int) -> list[bytes]:
    rng = np.random.default_rng(0)
    images = []
    for i in range(count):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)).save(buffer, format="PNG")
        (folder / f"{i // 1000:03d}").mkdir(parents=True, exist_ok=True)
        (folder / f"{i // 1000:03d}" / f"{i:06d}.png").write_bytes(buffer.getvalue())
        images.append(buffer.getvalue())
    return images


def raw_images_per_second(model, images: list[bytes]) -> float:
    start = time.perf_counter()
    for i in range(0, len(images), MAX_IMAGES):
        model.predict(pd.DataFrame({INPUT_COLUMN: images[i:i + MAX_IMAGES]}))
    return len(images) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="fast_net_small")
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="predict-speed-"))
    torch.manual_seed(0)
    weights = save_network(create_model(args.model), ModelSpec(args.model, CIFAR10_MEAN, CIFAR10_STD), scratch / "weights")
    logged = _server.log_model(scratch, weights)
    mlflow.set_tracking_uri(logged.tracking_uri)
    folder = scratch / "images"
    images = write_pngs(folder, args.images)
    model = mlflow.pyfunc.load_model(logged.model_uri)
    raw_images_per_second(model, images[:MAX_IMAGES])  # warm-up: first calls pick kernels

    repeats = []
    for repeat in range(args.repeats):
        # raw before and after the step, so load from other processes on a shared host falls on both.
        before = raw_images_per_second(model, images)
        with mlflow.start_run():
            step = predict(logged.model_uri, str(folder), str(scratch / "out.parquet"))["images_per_second"]
        raw = statistics.mean([before, raw_images_per_second(model, images)])
        repeats.append({"raw_images_per_second": raw, "step_images_per_second": step, "ratio": step / raw})
        print(f"repeat {repeat}: raw {raw:.0f} images/s, step {step:.0f} images/s, ratio {step / raw:.3f}", flush=True)

    median = {key: statistics.median(r[key] for r in repeats) for key in repeats[0]}
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    cpu = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name")), "")
    result = {
        "command": " ".join(["python", *sys.argv]),
        "date": datetime.date.today().isoformat(),
        "machine": {"cpu": cpu, "cores": torch.get_num_threads(), "avx512_bf16": "avx512_bf16" in lscpu,
                    "python": platform.python_version(), "torch": torch.__version__, "mlflow": mlflow.__version__},
        "model": args.model, "images": args.images, "batch_size": MAX_IMAGES,
        "median": median, "repeats": repeats,
    }
    print(json.dumps({"median": median, "machine": result["machine"]}, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
