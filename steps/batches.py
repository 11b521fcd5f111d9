"""Training and test batches cut from uint8 images, shuffled and augmented per epoch."""

from collections.abc import Iterator

import numpy as np
import torch

from cifar_models.preprocess import to_nchw
from steps.augment import Policy, augment_batches, host_to_device
from steps.distributed import Shard


def num_batches(n: int, batch_size: int, drop_last: bool) -> int:
    """Batches per epoch. Training drops the last partial batch (a batch of a few images gives
    BatchNorm noisy statistics and the schedule an uneven step), unless the set is smaller
    than one batch, in which case the whole set is the one batch."""
    if drop_last:
        return max(1, n // batch_size)
    return -(-n // batch_size)


def iterate_batches(x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor, batch_size: int, *,
                    generator: torch.Generator | None = None, drop_last: bool = False,
                    augment: Policy = None, workers: int = 0, shard: Shard | None = None,
                    flips: torch.Tensor | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(N, 3, H, W) uint8 image and int64 label batches from NHWC uint8 images.

    x is the stored set, numpy on the CPU or a tensor already on the device; it stays uint8
    and only each batch is copied out of it. With a generator the order is a fresh permutation
    drawn from it (one per call, i.e. per epoch); without, the stored order. A CPU-side policy
    is applied here, per batch, in `workers` processes (0 = in this one; augment.augment_batches);
    a device-side one is the caller's, after the move.

    With a shard (data-parallel training), only this process's part of each batch: the order
    is still drawn whole from the generator, so every process cuts the same batches as a
    single process would, and each keeps its own slice of them. A CPU-side policy then
    augments that slice, reseeded per process so that the processes' augmentations differ
    (process 0's are the single process's for its images).

    flips, a bool per stored image (augment.alternating_flips), mirrors the images it names as
    they are cut, before any policy sees them.
    """
    cpu_augment = augment is not None and not augment.on_device
    if cpu_augment and isinstance(x, torch.Tensor):
        raise ValueError(f"augmentation {augment.name!r} works on numpy images on the CPU; pass x as numpy")
    n = len(y)
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    count = num_batches(n, batch_size, drop_last)
    if shard is not None:
        if count * batch_size > n:
            raise ValueError(f"a shard is a part of whole batches; {n} images make no batch of {batch_size}")
        part = shard.part(batch_size)
        order = order[:count * batch_size].view(count, batch_size)[:, part].reshape(-1)
        batch_size = part.stop - part.start
    if isinstance(x, torch.Tensor):
        order = host_to_device(order, x.device)  # once per epoch, not once per batch
        if flips is not None:
            flips = host_to_device(flips, x.device)
        for b in range(count):
            idx = order[b * batch_size:(b + 1) * batch_size]
            yield _mirror(to_nchw(x[idx]), flips, idx), torch.as_tensor(y)[idx].to(torch.int64)
        return
    slices = [order[b * batch_size:(b + 1) * batch_size].numpy() for b in range(count)]
    if cpu_augment:
        # One seed per epoch from the training generator: the augmentations replay on resume.
        seed = int(torch.randint(0, 2**31 - 1, (), generator=generator)) if generator is not None else 0
        if shard is not None:
            seed += shard.rank * count  # batch b of process r: seed + r * count + b, all distinct
        batches = augment_batches(augment, x, slices, seed, workers)
    else:
        batches = (x[idx] for idx in slices)
    for images, idx in zip(batches, slices):  # batches first: its pool ends as it runs out
        yield _mirror(to_nchw(images), flips, idx), torch.as_tensor(y[idx], dtype=torch.int64)


def _mirror(images: torch.Tensor, flips: torch.Tensor | None, idx: torch.Tensor | np.ndarray) -> torch.Tensor:
    """NCHW images with those that flips names (by stored index idx) mirrored left to right."""
    if flips is None:
        return images
    return torch.where(flips[torch.as_tensor(idx)].view(-1, 1, 1, 1), images.flip(-1), images)
