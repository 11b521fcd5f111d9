"""Time of one training step (forward, backward, optimizer step) of a model, by dtype, memory layout
and batch size, on random data: what `hardware.hardware` and the CPU recipe are sized from. With
--forward, the time of one inference forward (eval mode, torch.inference_mode) instead: why
`cifar_models.preprocess.to_nchw` hands the networks NHWC-strided batches. With --muon, the
cpu recipe's step (whitening conv frozen, its bias trainable) with SGD and then with Muon on the
filters: what the orthogonalisation costs a step.

    .venv/bin/python benchmarks/step_time.py --models fast_net,fast_net_small --batch-sizes 256,512 --repeats 7
    .venv/bin/python benchmarks/step_time.py --whiten-bias --models fast_net_small --batch-sizes 128 --repeats 15
    .venv/bin/python benchmarks/step_time.py --forward --threads 1 --models fast_net,fast_net_small --batch-sizes 1,64,512 --repeats 9
    .venv/bin/python benchmarks/step_time.py --muon --models fast_net_small --batch-sizes 128 --repeats 15

Each configuration runs WARMUP untimed steps, then --repeats timed steps (time.perf_counter;
CUDA synchronised around each step); the median is reported, and the ratio to fp32 NCHW at the
same batch size is taken from the same run, as are comparisons between the models named. bf16
rows are skipped on a CPU without native bf16 unless --all, since oneDNN emulates it there and
the figure says nothing about a real choice.
"""

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from cifar_models import create_model  # noqa: E402
from steps import hardware, loop, optim, whiten  # noqa: E402

WARMUP = 2  # steps before timing: oneDNN/cuDNN pick and cache their kernels on the first ones


def step_seconds(model_name: str, hw: hardware.Hardware, batch_size: int, repeats: int,
                 forward_only: bool = False, whiten_bias: bool | None = None, optimizer: str = "sgd") -> list[float]:
    """whiten_bias None: the model as created; True or False: its first conv frozen as train's
    whitening leaves it, with the bias trainable (True) or frozen too (False). optimizer: a name
    in optim.OPTIMIZERS."""
    model = hardware.prepare_model(create_model(model_name), hw)
    if whiten_bias is not None:
        model.whiten.weight.requires_grad_(False)
        whiten.train_whiten_bias(model, whiten_bias)
    optimizer = optim.build_optimizer(optimizer, model, 0.01, 5e-4)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.2)
    x = torch.randn(batch_size, 3, 32, 32, device=hw.device)
    x = x.contiguous(memory_format=torch.channels_last) if hw.channels_last else x
    labels = torch.randint(0, 10, (batch_size,), device=hw.device)

    def step() -> torch.Tensor:
        if not forward_only:
            return loop.train_step(model, optimizer, loss_fn, x, labels, hw)[0]
        with torch.inference_mode(), hardware.autocast(hw):
            return model(x).sum()

    model.train(not forward_only)
    times = []
    for i in range(WARMUP + repeats):
        if hw.device.type == "cuda":
            torch.cuda.synchronize()
        began = time.perf_counter()
        step().item()  # waits for the step on any device
        if i >= WARMUP:
            times.append(time.perf_counter() - began)
    return times


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="fast_net", help="comma-separated model names")
    p.add_argument("--batch-sizes", default="256,512")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--device", default="auto")
    p.add_argument("--all", action="store_true", help="bf16 rows even where bf16 is emulated")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--forward", action="store_true", help="time an inference forward, not a training step")
    mode.add_argument("--whiten-bias", action="store_true",
                   help="only fp32 channels_last rows, with the first conv frozen as whitening leaves it: bias "
                        "trainable, then frozen too (whiten.train_whiten_bias); the ratio is to the first")
    mode.add_argument("--muon", action="store_true",
                      help="only fp32 channels_last rows, the first conv frozen as whitening leaves it (bias "
                           "trainable): SGD, then Muon on the filters; the ratio is to the first")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")
    p.add_argument("--out", type=Path, default=Path("step_time.json"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = hardware.hardware(args.device, "fp32").device
    native_bf16 = device.type == "cuda" or hardware.cpu_has_native_bf16()
    layouts = [(None, False), (None, True)]
    if native_bf16 or args.all:
        layouts += [(torch.bfloat16, False), (torch.bfloat16, True)]
    # What is compared, per model and batch size: the first row is the base of the ratios.
    if args.whiten_bias:
        hw = hardware.Hardware(device, None, True)
        variants = [(hw, True, "sgd", {"whiten_bias": "trains"}), (hw, False, "sgd", {"whiten_bias": "frozen"})]
        ratio, base_name = "vs_bias_trains", "a trainable whitening bias"
    elif args.muon:
        hw = hardware.Hardware(device, None, True)
        variants = [(hw, True, "sgd", {"optimizer": "sgd"}), (hw, True, "muon", {"optimizer": "muon"})]
        ratio, base_name = "vs_sgd", "SGD"
    else:
        variants = [(hardware.Hardware(device, dtype, channels_last), None, "sgd", {})
                    for dtype, channels_last in layouts]
        ratio, base_name = "vs_fp32_nchw", "fp32 NCHW"
    rows = []
    for model in args.models.split(","):
        for batch_size in (int(b) for b in args.batch_sizes.split(",")):
            base = None
            for hw, whiten_bias, optimizer, label in variants:
                median = statistics.median(step_seconds(model, hw, batch_size, args.repeats, args.forward, whiten_bias,
                                                        optimizer))
                base = base or median
                row = {"model": model, "batch_size": batch_size, "autocast": str(hw.autocast).removeprefix("torch."),
                       "channels_last": hw.channels_last, **label, "median_ms": 1000 * median, ratio: median / base,
                       "ms_per_image": 1000 * median / batch_size}
                rows.append(row)
                print(f"{model:15s} batch {batch_size:4d}  {row['autocast']:8s} channels_last={hw.channels_last!s:5s} "
                      f"{''.join(f'{k}={v} ' for k, v in label.items())}{row['median_ms']:8.1f} ms  "
                      f"{row['ms_per_image']:5.2f} ms/image  x{row[ratio]:.2f} of {base_name}", flush=True)
    result = {"benchmark": "step_time", "command": " ".join(["python", "benchmarks/step_time.py", *(argv or sys.argv[1:])]),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
              "machine": {"platform": platform.platform(), "processor": platform.processor(),
                          "torch": torch.__version__, "threads": torch.get_num_threads(), "device": str(device),
                          "native_bf16": native_bf16},
              "timed": "inference forward" if args.forward else "training step", "models": args.models,
              "repeats": args.repeats, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
