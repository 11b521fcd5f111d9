"""The first conv set to a patch whitening of the training images and frozen (airbench94's init)."""

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from cifar_models.preprocess import normalize, to_nchw


def patch_whitening(images: torch.Tensor, kernel: tuple[int, int], eps: float = 5e-4,
                    chunk: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights, bias) of a conv that whitens the kernel-sized patches of normalised (N, C, H, W)
    float images: the patches' covariance is V diag(lambda) V^T, and filter i is the i-th
    eigenvector over sqrt(lambda_i + eps), largest eigenvalue first, so the filter outputs
    are decorrelated with unit variance (eps keeps the near-null directions from being
    amplified into noise). The bias subtracts the patch mean, so the outputs are also centred.
    The filters come twice, as +v and -v: after the GELU that follows, each direction keeps
    both its signs (airbench94's 2 x 12 = 24 channels for 2x2x3 patches).
    """
    c, (h, w) = images.shape[1], kernel
    dim = c * h * w
    total = torch.zeros(dim, dtype=torch.float64)
    outer = torch.zeros(dim, dim, dtype=torch.float64)
    count = 0
    for start in range(0, len(images), chunk):  # ~50 MB of patches at a time, not 230 MB at once
        patches = images[start:start + chunk].unfold(2, h, 1).unfold(3, w, 1)  # N, C, H', W', h, w
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, dim).double()  # rows in (c, h, w) order
        total += patches.sum(0)
        outer += patches.T @ patches
        count += len(patches)
    mean = total / count
    covariance = outer / count - torch.outer(mean, mean)
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)  # ascending
    filters = (eigenvectors.T / torch.sqrt(eigenvalues.clamp(min=0) + eps)[:, None]).flip(0)
    weights = torch.cat([filters, -filters])
    return weights.reshape(2 * dim, c, h, w).float(), (-(weights @ mean)).float()


def whiten_first_conv(model: nn.Module, images: np.ndarray, mean: Sequence[float], std: Sequence[float],
                      eps: float = 5e-4) -> bool:
    """Set the model's `whiten` conv to the patch whitening of these NHWC uint8 training images
    (normalised as training normalises them) and freeze its weights; its bias still trains
    (train_whiten_bias freezes it later).
    Returns False, changing nothing, when the model has no `whiten` conv of the whitening
    shape (2 x C*h*w filters over C input channels).

    Why frozen: the whitened basis is already what the first layer should compute, and
    training it at the high LRs of the fast recipes only makes it drift (airbench94 freezes
    it for the same reason). It is still an ordinary conv: the state_dict loads into a fresh
    create_model(name) unchanged.
    """
    conv = getattr(model, "whiten", None)
    if not isinstance(conv, nn.Conv2d) or conv.bias is None:
        return False
    out_channels, in_channels, h, w = conv.weight.shape
    if out_channels != 2 * in_channels * h * w or conv.stride != (1, 1) or conv.groups != 1:
        return False
    x = normalize(to_nchw(images), mean, std)
    weights, bias = patch_whitening(x, (h, w), eps)
    with torch.no_grad():
        conv.weight.copy_(weights)
        conv.bias.copy_(bias)
    conv.weight.requires_grad_(False)
    return True


def train_whiten_bias(model: nn.Module, trainable: bool) -> None:
    """Let the whitening conv's bias train, or freeze it as its weights are. Frozen, nothing
    before the first block needs a gradient, so backward stops there: it skips the first
    block conv's input gradient and the GELU's, computed at the largest resolution of the net.
    airbench94 trains the bias for its first 3 of ~10 epochs. A model without a `whiten`
    conv is left as it is."""
    conv = getattr(model, "whiten", None)
    if isinstance(conv, nn.Conv2d) and conv.bias is not None:
        conv.bias.requires_grad_(trainable)
