"""The speed recipe's parts on tiny inputs: test-time augmentation, the EMA of the weights,
the whitening init of the first conv, and how a recipe and explicit options combine."""

import numpy as np
import pytest
import torch
from torch import nn

from cifar_models.inference import predict_logits
from cifar_models.registry import create_model
from steps.data import channel_stats, synthetic

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


# --- test-time augmentation ----------------------------------------------------------------------------

def test_tta_views_average_to_plain_on_a_flip_and_shift_symmetric_image():
    model = create_model("fast_net").eval()
    rng = np.random.default_rng(0)
    # A constant image is its own mirror and its own one-pixel translation (reflect padding).
    constant = np.broadcast_to(rng.integers(0, 256, (4, 1, 1, 3), dtype=np.uint8), (4, 32, 32, 3)).copy()
    plain = predict_logits(model, constant, MEAN, STD)
    for tta in ("flip", "flip_shift"):
        assert torch.allclose(predict_logits(model, constant, MEAN, STD, tta=tta), plain, atol=1e-5)
    # A mirror-symmetric image: flip TTA is plain, flip_shift in general is not.
    half = rng.integers(0, 256, (4, 32, 16, 3), dtype=np.uint8)
    mirrored = np.concatenate([half, half[:, :, ::-1]], axis=2)
    assert torch.allclose(predict_logits(model, mirrored, MEAN, STD, tta="flip"),
                          predict_logits(model, mirrored, MEAN, STD), atol=1e-5)


def test_tta_shapes_batches_and_unknown_mode():
    model = create_model("fast_net").eval()
    images = synthetic(n_train=5, n_test=0)[0]
    for tta in ("none", "flip", "flip_shift"):
        logits = predict_logits(model, images, MEAN, STD, batch_size=2, tta=tta)
        assert logits.shape == (5, 10) and logits.dtype == torch.float32 and torch.isfinite(logits).all()
        assert torch.allclose(logits, predict_logits(model, images, MEAN, STD, batch_size=5, tta=tta), atol=1e-5)
    assert not torch.allclose(predict_logits(model, images, MEAN, STD, tta="flip_shift"),
                              predict_logits(model, images, MEAN, STD, tta="flip"))
    with pytest.raises(ValueError, match="unknown tta 'rot'"):
        predict_logits(model, images, MEAN, STD, tta="rot")
