"""Training-time augmentation policies, by name.

Two kinds, both on uint8 images, so no float copy of a batch exists before the model's door:

- albumentations policies run on the CPU, one image at a time, on (N, 32, 32, 3) NHWC numpy
  batches as the batch iterator cuts them from the stored set;
- the tensor policies (`tensor`, `flip_translate`, `altflip_translate`) run on (N, 3, 32, 32)
  NCHW tensors on whatever device the batch is on, batched with no per-image Python loop, for
  when CPU-side augmentation would starve a GPU.

albumentations and OpenCV are imported only when an albumentations policy is built, so the
tensor policies (and the training benchmark) run where only torch is installed.

Randomness comes from the caller: an albumentations policy is reseeded per batch from a number
drawn once per epoch from the training generator (augment_batches), and the tensor policy draws
from that generator directly, so a checkpoint of the generator's state replays the same
augmentations on resume.
"""

import itertools
import multiprocessing
import signal
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch

from steps.errors import StepError

# Data statistics arrive in [0, 1] units; fills are in pixel units.
Mean = Sequence[float]


def pixel_mean(mean: Mean) -> tuple[int, int, int]:
    return tuple(int(round(255 * m)) for m in mean)


class AlbumentationsPolicy:
    """An albumentations pipeline applied per image to NHWC uint8 numpy batches on the CPU."""

    on_device = False

    def __init__(self, name: str, transform) -> None:  # an albumentations Compose
        self.name = name
        self.transform = transform

    def reseed(self, seed: int) -> None:
        self.transform.set_random_seed(seed)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        out = np.empty_like(images)
        for i, image in enumerate(images):
            out[i] = self.transform(image=image)["image"]
        return out


def augment_batches(policy: AlbumentationsPolicy, x: np.ndarray, batches: Sequence[np.ndarray], seed: int,
                    workers: int = 0) -> Iterator[np.ndarray]:
    """policy applied to x[idx] for each idx in batches, in order. Batch b is augmented right
    after reseeding the policy with seed + b, so the images are the same whatever `workers` is.

    workers 0 augments here, one image after another. More forks that many processes, which
    inherit x and the policy (only the indices go out; the augmented uint8 batches come back)
    and keep two batches each in flight: per-image albumentations on one core cannot keep up
    with a GPU (benchmarks/README.md, "Augmentation"). The pool lives for one
    pass over `batches` and is ended when it is done or abandoned."""
    if workers == 0:
        for b, idx in enumerate(batches):
            policy.reseed(seed + b)
            yield policy(x[idx])
        return
    # fork, as torch's DataLoader does on Linux: the children share x with this process
    # (copy-on-write) instead of unpickling a copy each. They run only numpy, albumentations and
    # single-threaded OpenCV, none of the torch, CUDA or MLflow code whose threads they lack.
    # An executor rather than multiprocessing.Pool: a worker that dies (the OOM killer) breaks
    # its futures at once instead of leaving its batch awaited for ever.
    executor = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"), initializer=_adopt,
                                   initargs=(policy, x))
    pending = deque()
    try:
        tasks = ((idx, seed + b) for b, idx in enumerate(batches))
        pending.extend(executor.submit(_augment_batch, *task) for task in itertools.islice(tasks, 2 * workers))
        while pending:
            images = pending.popleft().result()
            pending.extend(executor.submit(_augment_batch, *task) for task in itertools.islice(tasks, 1))
            yield images
    except BrokenProcessPool:
        raise StepError("an augmentation worker process died (killed, or out of memory?); run the same command "
                        "again to resume") from None
    finally:
        # Batches not started are dropped; those in flight are waited for, so that no worker is
        # killed holding the queues' locks (multiprocessing.Pool.terminate() did that, and then
        # waited on the locks for ever: it hung the test suite).
        executor.shutdown(wait=True, cancel_futures=True)


# A worker's policy and images, set once when the pool starts it (each worker is its own process).
_worker: dict = {}


def _adopt(policy: AlbumentationsPolicy, x: np.ndarray) -> None:
    # Ctrl-C is the training process's to handle: it ends the pool as above, which needs the
    # workers to finish their batches rather than die holding the queues' locks.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _worker.update(policy=policy, x=x)


def _augment_batch(idx: np.ndarray, seed: int) -> np.ndarray:
    _worker["policy"].reseed(seed)
    return _worker["policy"](_worker["x"][idx])


class TensorPolicy:
    """Random horizontal flip, random translation and cutout on NCHW uint8 tensors, batched.
    With alternate_flip the flip is not random here: the batch iterator mirrors the images
    that alternating_flips names for the epoch, before this policy sees them.

    Translation shifts each image by up to `max_shift` pixels in each direction, reflecting at
    the borders (the index arithmetic of reflect padding followed by a random crop, done as one
    gather, so no padded copy is made). Cutout fills one `cutout`-sized square per image with
    the data mean; the square's centre may lie near the border, so it is sometimes clipped, as
    in DeVries & Taylor's original; cutout 0 leaves it out.
    """

    on_device = True

    def __init__(self, mean: Mean, max_shift: int = 2, cutout: int = 8, name: str = "tensor",
                 alternate_flip: bool = False) -> None:
        self.name = name
        self.alternate_flip = alternate_flip
        self.fill = torch.tensor(pixel_mean(mean), dtype=torch.uint8).view(1, 3, 1, 1)
        self.max_shift = max_shift
        self.cutout = cutout

    def reseed(self, seed: int) -> None:  # draws from the caller's generator instead
        pass

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        n, _, h, w = images.shape
        return self.apply(images, self.draw(n, h, w, generator))

    def draw(self, n: int, h: int, w: int, generator: torch.Generator) -> torch.Tensor:
        """The random parameters of n images, (5, n) int64 on the CPU: flip, dy, dx, and the
        cutout's centre cy, cx. Drawn on the CPU from the one checkpointed generator: a handful
        of numbers per image, not worth a device-side generator of their own. Apart from
        apply so that a data-parallel rank draws a whole batch's and applies its share's."""
        flip = (torch.rand(n, generator=generator) < 0.5) & (not self.alternate_flip)
        dy, dx = torch.randint(-self.max_shift, self.max_shift + 1, (2, n), generator=generator)
        cy = torch.randint(0, h, (n,), generator=generator)
        cx = torch.randint(0, w, (n,), generator=generator)
        return torch.stack([flip.long(), dy, dx, cy, cx])

    def apply(self, images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """images augmented with draw's parameters, one column per image."""
        n, _, h, w = images.shape
        device = images.device
        flip, dy, dx, cy, cx = host_to_device(params, device)  # one copy
        flip = flip.bool()

        rows = _reflect(torch.arange(h, device=device)[None, :] + dy[:, None], h)  # (n, h)
        cols = torch.arange(w, device=device)[None, :] + dx[:, None]
        cols = torch.where(flip[:, None], (w - 1) - cols, cols)  # mirror = read columns backwards
        cols = _reflect(cols, w)
        batch = torch.arange(n, device=device)[:, None, None, None]
        channel = torch.arange(3, device=device)[None, :, None, None]
        out = images[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]

        if self.cutout == 0:
            return out
        half = self.cutout // 2
        y = torch.arange(h, device=device)[None, :, None]
        x = torch.arange(w, device=device)[None, None, :]
        hole = ((y >= (cy - half)[:, None, None]) & (y < (cy - half + self.cutout)[:, None, None])
                & (x >= (cx - half)[:, None, None]) & (x < (cx - half + self.cutout)[:, None, None]))
        return torch.where(hole[:, None], self.fill.to(device), out)


def alternating_flips(n: int, seed: int, epoch: int) -> torch.Tensor:
    """Which of n training images epoch `epoch` (counted from 1) mirrors, as airbench94 does: a
    random half, drawn once from the seed, in odd epochs and the other half in even ones. Every
    two epochs so show each image both ways round, where independent coin flips show a half of
    them one way only; in a run of a few epochs that is worth more epochs (benchmarks/README.md,
    "CPU recipe"). A function of seed and epoch alone, so a resume or a data-parallel rank
    mirrors the same images."""
    first = torch.rand(n, generator=torch.Generator().manual_seed(seed)) < 0.5
    return first if epoch % 2 else ~first


def epoch_flips(policy: "Policy", n: int, seed: int, epoch: int) -> torch.Tensor | None:
    """The images of n that epoch `epoch` mirrors for an alternating-flip policy
    (alternating_flips), for the batch iterator's `flips`; None for any other policy."""
    return alternating_flips(n, seed, epoch) if getattr(policy, "alternate_flip", False) else None


def host_to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """t on device, without making the host wait for the GPU: a copy from ordinary (pageable)
    memory to a GPU waits until every kernel already queued there has run, which in a training
    loop stalls the host once per copy, every step. From pinned memory, with non_blocking, the
    copy is queued like a kernel (torch keeps the pinned block alive until it has run)."""
    if t.device == device or device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def _reflect(index: torch.Tensor, size: int) -> torch.Tensor:
    """Indices outside 0..size-1 mirrored back in without repeating the edge (cv2's
    BORDER_REFLECT_101), valid for overshoots smaller than size."""
    index = index.abs()
    return torch.where(index > size - 1, 2 * (size - 1) - index, index)


def _albumentations():
    """The albumentations and cv2 modules, with OpenCV's thread pool off in this process: a
    process forked once that pool has started (augment_batches' workers) can hang in its first
    OpenCV call, waiting on threads it does not have; and on 32x32 images the pool gains
    nothing, the parallelism being augment_batches' processes."""
    import albumentations
    import cv2

    cv2.setNumThreads(0)
    return albumentations, cv2


def _reference(mean: Mean) -> AlbumentationsPolicy:
    # The ResNet-9 recipe: pad 4 on each side (reflected, so the crop never shows a black
    # band the test set has no counterpart of), random 32x32 crop, mirror, one 8x8 hole
    # filled with the mean so the normalised hole is zero.
    A, cv2 = _albumentations()

    return AlbumentationsPolicy("reference", A.Compose([
        A.PadIfNeeded(40, 40, border_mode=cv2.BORDER_REFLECT_101),
        A.RandomCrop(32, 32),
        A.HorizontalFlip(p=0.5),
        A.CoarseDropout(num_holes_range=(1, 1), hole_height_range=(8, 8), hole_width_range=(8, 8),
                        fill=pixel_mean(mean), p=0.5),
    ]))


def _separable(mean: Mean) -> AlbumentationsPolicy:
    # The separable-net recipe: mirror, a small shift/scale/rotate (albumentations 2's Affine,
    # which replaces ShiftScaleRotate), one 16x16 hole filled with the mean.
    A, cv2 = _albumentations()

    return AlbumentationsPolicy("separable", A.Compose([
        A.HorizontalFlip(p=0.5),
        A.Affine(translate_percent=(-0.0625, 0.0625), scale=(0.9, 1.1), rotate=(-15, 15),
                 border_mode=cv2.BORDER_REFLECT_101, p=0.5),
        A.CoarseDropout(num_holes_range=(1, 1), hole_height_range=(16, 16), hole_width_range=(16, 16),
                        fill=pixel_mean(mean), p=0.5),
    ]))


Policy = AlbumentationsPolicy | TensorPolicy | None

POLICIES: dict[str, Callable[[Mean], Policy]] = {
    "reference": _reference,
    "separable": _separable,
    "tensor": TensorPolicy,
    # airbench94's augmentation: flip and translate, no cutout. A short run underfits rather
    # than overfits, and cutout's extra regularisation costs it accuracy
    # (benchmarks/README.md, "CPU recipe").
    "flip_translate": lambda mean: TensorPolicy(mean, cutout=0, name="flip_translate"),
    # The same with airbench's alternating flip (alternating_flips) instead of a coin per image.
    "altflip_translate": lambda mean: TensorPolicy(mean, cutout=0, name="altflip_translate", alternate_flip=True),
    "none": lambda mean: None,
}


def check_aug(name: str) -> None:
    if name not in POLICIES:
        raise StepError(f"unknown augmentation {name!r}; known: {', '.join(POLICIES)}")


def build_policy(name: str, mean: Mean) -> Policy:
    """The named policy for data with this per-channel mean ([0, 1] units); None for `none`."""
    try:
        builder = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown augmentation {name!r}; known: {', '.join(POLICIES)}") from None
    return builder(mean)
