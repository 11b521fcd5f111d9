"""The device and the precision a run trains in, and the model built there in its layout."""

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from cifar_models.registry import create_model
from steps.errors import StepError


@dataclass(frozen=True)
class Hardware:
    device: torch.device
    autocast: torch.dtype | None  # dtype of the forward pass under autocast; None = float32 throughout
    channels_last: bool  # NHWC memory layout for model and inputs (faster convs on tensor cores and oneDNN)


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN runs bf16 convolutions natively on this CPU (AVX512-BF16 or AMX), rather
    than emulating them in float32, which would make bf16 slower, not faster."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def hardware(device: str = "auto", precision: str = "auto") -> Hardware:
    """device auto|cpu|cuda[:n]; precision auto|bf16|fp32.

    auto: CUDA if present. On CUDA, bf16 autocast. On a CPU with native bf16
    (cpu_has_native_bf16), the same: with channels_last it more than halves fast_net's training
    step there. On other CPUs bf16 is emulated and slower, so plain float32 there. Under
    autocast BatchNorm still runs in float32 and the loss is taken on float32 logits.
    channels_last is always on: oneDNN's and cuDNN's convolutions are faster in NHWC whatever
    the dtype, float32 on an AVX2-only CPU included (benchmarks/README.md, "CPU recipe").
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise StepError("--device cuda was asked for but no CUDA device is available; use --device cpu or auto")
    if precision not in ("auto", "bf16", "fp32"):
        raise StepError(f"unknown precision {precision!r}; use auto, bf16 or fp32")
    if precision == "auto":
        bf16 = dev.type == "cuda" or (dev.type == "cpu" and cpu_has_native_bf16())
    else:
        bf16 = precision == "bf16"
    if dev.type == "cuda":
        # Every training step has the same shapes, so cuDNN's per-shape search for the fastest
        # convolution algorithm is paid once and then reused.
        torch.backends.cudnn.benchmark = True
    return Hardware(dev, torch.bfloat16 if bf16 else None, channels_last=True)


def describe(device: torch.device) -> str:
    """The machine in words, for the record (train's `hardware` tag, the model card)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        name = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        name = "CPU"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{name}, {cores} cores"


def autocast(hw: Hardware) -> torch.autocast:
    """The forward pass's precision context: autocast to hw.autocast, or a no-op in float32."""
    return torch.autocast(hw.device.type, dtype=hw.autocast or torch.float32, enabled=hw.autocast is not None)


def prepare_model(model: nn.Module, hw: Hardware) -> nn.Module:
    model = model.to(hw.device)
    return model.to(memory_format=torch.channels_last) if hw.channels_last else model


def build_model(name: str, seed: int, hw: Hardware) -> nn.Module:
    """The named network, initialised from `seed`, on the device in the training layout."""
    torch.manual_seed(seed)
    try:
        model = create_model(name)
    except ValueError as exc:
        raise StepError(str(exc)) from None
    return prepare_model(model, hw)
