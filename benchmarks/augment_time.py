"""Time of one epoch's augmentation by a per-image (albumentations) policy, in this process and
in pools of worker processes (batches.iterate_batches' `workers`, which train uses when a GPU
trains: training.augment_workers): whether the pool keeps a GPU fed where one core cannot.

    python benchmarks/augment_time.py --policy reference --images 50000 --workers 0,1,2 --repeats 5

The images are synthetic (augmentation time does not depend on their content), cut into batches
of --batch-size in a seeded order as train cuts them. Each repeat times every worker count in
turn (time.perf_counter, pool start-up included), so each ratio to the first count is taken
within one repeat; the medians over repeats are reported.
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from steps import batches  # noqa: E402
from steps.augment import build_policy  # noqa: E402
from steps.data import synthetic  # noqa: E402


def epoch_seconds(policy, x, y, batch_size: int, workers: int) -> float:
    began = time.perf_counter()
    for _ in batches.iterate_batches(x, y, batch_size, generator=torch.Generator().manual_seed(0), drop_last=True,
                                    augment=policy, workers=workers):
        pass
    return time.perf_counter() - began


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policy", default="reference", help="an albumentations policy: reference or separable")
    p.add_argument("--images", type=int, default=50_000)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--workers", default="0,1,2", help="comma-separated worker counts; the first is the base of the ratios")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path, default=Path("augment_time.json"))
    args = p.parse_args(argv)

    x, y, *_ = synthetic(n_train=args.images, n_test=0)
    policy = build_policy(args.policy, (0.49, 0.48, 0.45))
    if policy is None or policy.on_device:
        raise SystemExit(f"{args.policy!r} is not a per-image CPU policy")
    counts = [int(w) for w in args.workers.split(",")]
    seconds = {w: [] for w in counts}
    ratios = {w: [] for w in counts}
    for _ in range(args.repeats):
        times = {w: epoch_seconds(policy, x, y, args.batch_size, w) for w in counts}
        for w in counts:
            seconds[w].append(times[w])
            ratios[w].append(times[w] / times[counts[0]])
    rows = [{"workers": w, "median_s": statistics.median(seconds[w]),
             "images_per_s": args.images / statistics.median(seconds[w]),
             f"vs_{counts[0]}_workers": statistics.median(ratios[w]), "seconds": seconds[w]} for w in counts]
    for row in rows:
        print(f"workers {row['workers']:2d}: {row['median_s']:7.2f} s an epoch of {args.images} images "
              f"({row['images_per_s']:8.0f} images/s), x{row[f'vs_{counts[0]}_workers']:.2f} of {counts[0]} workers")
    result = {"benchmark": "augment_time",
              "command": " ".join(["python", "benchmarks/augment_time.py", *(argv or sys.argv[1:])]),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
              "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count()},
              "policy": args.policy, "images": args.images, "batch_size": args.batch_size, "repeats": args.repeats,
              "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
