"""The one preprocessing path shared by training, evaluation and the served model.

Images travel as uint8 for as long as possible (a quarter of the memory of float32, and
augmentation works on them unchanged); they become normalised float32 only at the model's
door, in `normalize`. The mean and std are those `download_data` measured on the training
set and stored beside the weights; the constants below are the official figures, used only
where no measurement is at hand.
"""

from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch

CLASSES: tuple[str, ...] = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)
IMAGE_SIZE = 32

# Per-channel statistics of the official CIFAR-10 training set, pixel values scaled to [0, 1].
# (The std often quoted as 0.2023/0.1994/0.2010 is that of a different computation, copied
# from one repository to the next; these are the std of all training pixels per channel.)
CIFAR10_MEAN: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
CIFAR10_STD: tuple[float, float, float] = (0.2470, 0.2435, 0.2616)


def to_nchw(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(N, H, W, 3) uint8, the layout of decoded images and of the stored data set,
    to a (N, 3, H, W) uint8 tensor, the layout the networks take.

    A permuted view, not a copy: its strides are channels_last's, and normalize keeps them, so
    oneDNN runs its NHWC convolutions on the batch whatever the weights' layout. Keep it so: an
    inference forward in NCHW is markedly slower on a CPU (benchmarks/README.md, "Endpoint")."""
    images = torch.as_tensor(images)
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 images of shape (N, H, W, 3), got {tuple(images.shape)} {images.dtype}")
    return images.permute(0, 3, 1, 2)


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(N, 3, H, W) uint8 to normalised float32 on the same device, channel by channel.

    One multiply-add: x * (1 / (255 std)) - mean / std, so that the batch is read once.
    """
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected uint8 images of shape (N, 3, H, W), got {tuple(images.shape)} {images.dtype}")
    scale, shift = _affine(tuple(map(float, mean)), tuple(map(float, std)), images.device)
    return images.float() * scale - shift


@lru_cache(maxsize=16)
def _affine(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """normalize's per-channel scale 1 / (255 std) and shift mean / std, as (1, 3, 1, 1) float32
    tensors on device. Made once per statistics and device: making them on a GPU is a copy
    from host memory, which waits for all the work queued there, and a training step that
    waited so would leave the GPU idle while the host prepared the next one."""
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (1.0 / (255.0 * std_t)).to(device), (mean_t / std_t).to(device)
