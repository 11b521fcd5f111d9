"""Calibration and `unknown` maths on inputs with known answers, the foreign-image generators,
and the model card built from recorded runs, all in-process."""

import builtins
import logging
import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from cifar_models.calibration import Calibration, calibrated_probabilities, ood_scores, unknown_flags
from steps import calibration as C
from steps import ood


# --- NLL, ECE, temperature ----------------------------------------------------------------

def test_nll_of_uniform_logits_is_log_of_the_class_count():
    assert C.nll(np.zeros((5, 10)), np.arange(5)) == pytest.approx(math.log(10))


def test_ece_is_zero_when_confidence_matches_accuracy_and_the_gap_when_not():
    # 10 images at confidence 0.8, 8 of them right: calibrated.
    probabilities = np.full((10, 2), 0.2)
    probabilities[:, 0] = 0.8
    labels = np.array([0] * 8 + [1] * 2)
    assert C.ece(probabilities, labels) == pytest.approx(0.0)
    # Certain and right half the time: off by 0.5. A confidence of exactly 1 lands in the last bin.
    certain = np.tile([1.0, 0.0], (10, 1))
    assert C.ece(certain, np.array([0, 1] * 5)) == pytest.approx(0.5)
    r = C.reliability(certain, np.array([0, 1] * 5))
    assert len(r.counts) == C.ECE_BINS and r.counts[-1] == 10 and r.accuracy[-1] == pytest.approx(0.5)


def test_ece_weights_bins_by_their_images():
    # 3 images at 0.9 all right (gap 0.1), 1 image at 0.6 wrong (gap 0.6): (3*0.1 + 0.6) / 4.
    probabilities = np.array([[0.9, 0.1]] * 3 + [[0.6, 0.4]])
    assert C.ece(probabilities, np.array([0, 0, 0, 1])) == pytest.approx((3 * 0.1 + 0.6) / 4)


def test_temperature_fit_recovers_the_temperature_labels_were_drawn_with():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 4, size=(20000, 10))
    true_t = 2.5
    p = C.softmax_per_row(logits, true_t)
    labels = (p.cumsum(axis=1) > rng.random((len(p), 1))).argmax(axis=1)
    fitted = C.fit_temperature(logits, labels)
    assert fitted == pytest.approx(true_t, rel=0.05)
    # The fit is the NLL's minimum: a little either side is worse.
    assert C.nll(logits, labels, fitted) < min(C.nll(logits, labels, fitted * 0.9), C.nll(logits, labels, fitted * 1.1))


def test_cross_fit_scores_each_half_with_the_other_halfs_temperature():
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 3, size=(400, 10))
    labels = (C.softmax_per_row(logits, 2.0).cumsum(axis=1) > rng.random((400, 1))).argmax(axis=1)
    temperatures = C.cross_fit_temperatures(logits, labels)
    assert len(np.unique(temperatures)) == 2 and ((temperatures > 1) & (temperatures < 4)).all()


def test_served_probabilities_are_the_softmax_of_logits_over_t():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
    expected = torch.softmax(logits / 1.7, dim=1)
    torch.testing.assert_close(calibrated_probabilities(logits, 1.7), expected)
    np.testing.assert_allclose(C.softmax_per_row(logits.numpy(), 1.7), expected.numpy(), atol=1e-6)


# --- scores, AUROC, threshold ------------------------------------------------------------

def test_scores_are_higher_for_more_confident_outputs():
    logits = torch.tensor([[5.0, 0.0, 0.0], [0.1, 0.0, 0.0]])
    for score in ("max_probability", "energy"):
        s = ood_scores(logits, 2.0, score)
        assert s[0] > s[1]
    torch.testing.assert_close(ood_scores(logits, 2.0, "energy"), 2.0 * torch.logsumexp(logits / 2.0, dim=1))
    with pytest.raises(ValueError, match="unknown score"):
        ood_scores(logits, 1.0, "entropy")


def test_auroc_known_answers_and_ties_count_half():
    assert C.auroc(np.array([3.0, 4.0]), np.array([1.0, 2.0])) == 1.0
    assert C.auroc(np.array([1.0, 2.0]), np.array([3.0, 4.0])) == 0.0
    assert C.auroc(np.array([1.0, 1.0]), np.array([1.0])) == 0.5
    rng = np.random.default_rng(2)
    inside, outside = rng.integers(0, 20, 300).astype(float), rng.integers(0, 15, 200).astype(float)
    pairs = (inside[:, None] > outside[None, :]).mean() + 0.5 * (inside[:, None] == outside[None, :]).mean()
    assert C.auroc(inside, outside) == pytest.approx(pairs)


def test_threshold_accepts_the_stated_share():
    scores = np.random.default_rng(3).permutation(np.arange(1000.0))
    threshold = C.accept_threshold(scores, 0.95)
    assert C.accept_rate(scores, threshold) == pytest.approx(0.95, abs=0.001)


def test_unknown_is_score_below_threshold_and_never_without_one():
    logits = torch.tensor([[6.0, 0.0], [0.2, 0.0]])
    assert unknown_flags(logits, Calibration()).tolist() == [False, False]
    flags = unknown_flags(logits, Calibration(temperature=1.0, score="max_probability", threshold=0.9))
    assert flags.tolist() == [False, True]


def test_calibration_json_round_trips_and_refuses_nonsense():
    c = Calibration(temperature=1.5, score="energy", threshold=3.25, accept_share=0.95)
    assert Calibration.from_json(c.to_json()) == c
    assert Calibration.from_json(Calibration().to_json()) == Calibration()
    with pytest.raises(ValueError):
        Calibration.from_json('{"temperature": 0, "score": "energy"}')


# --- foreign images ----------------------------------------------------------------------

def test_synthetic_sources_are_deterministic_32x32x3_uint8():
    first, again = ood.ood_sources(8, seed=5, with_natural=False), ood.ood_sources(8, seed=5, with_natural=False)
    assert tuple(first) == ood.SYNTHETIC
    for name, images in first.items():
        assert images.shape == (8, 32, 32, 3) and images.dtype == np.uint8, name
        assert np.array_equal(images, again[name]), name
    assert (first["flat"].reshape(8, -1, 3).std(axis=1) == 0).all()  # one colour each
    assert (first["text"].reshape(8, -1, 3).std(axis=1).max(axis=1) > 0).all()  # something was written


def test_natural_sources_are_crops_of_skimage_photos_and_faces():
    pytest.importorskip("skimage")
    sources = ood.natural(np.random.default_rng(0))
    assert sources["photos"].shape == (len(ood.PHOTOS) * ood.CROPS_PER_PHOTO, 32, 32, 3)
    assert sources["faces"].shape == (100, 32, 32, 3)
    assert all(images.dtype == np.uint8 for images in sources.values())
    assert np.array_equal(sources["photos"], ood.natural(np.random.default_rng(0))["photos"])


def test_without_scikit_image_natural_sources_are_skipped_with_a_log_line(monkeypatch, caplog):
    real_import = builtins.__import__

    def no_skimage(name, *args, **kwargs):
        if name == "skimage" or name.startswith("skimage."):
            raise ImportError("no skimage")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_skimage)
    with caplog.at_level(logging.WARNING):
        sources = ood.ood_sources(2)
    assert tuple(sources) == ood.SYNTHETIC
    assert "natural-photo OOD sources photos, faces skipped" in caplog.text


# --- the model card ----------------------------------------------------------------------

def test_model_card_holds_every_section_from_the_recorded_runs():
    from steps.model_card import CardInputs, model_card

    def run(run_id, params=None, metrics=None, tags=None):
        return SimpleNamespace(info=SimpleNamespace(run_id=run_id),
                               data=SimpleNamespace(params=params or {}, metrics=metrics or {}, tags=tags or {}))

    train = run("t1", {"model": "fast_net", "recipe": "cpu", "epochs": "10", "data_digest": "abc123",
                       "optimizer": "recipe", "optimizer_resolved": "muon"},
                {"train_seconds": 321.0}, {"hardware": "Some CPU, 2 cores", "precision": "float32"})
    evaluate = run("e1", metrics={"test_accuracy": 0.9, "test_accuracy_flip_tta": 0.91, "test_accuracy_tta": 0.92,
                                  "val_accuracy": 0.89, "temperature": 1.4, "test_nll": 0.4, "test_nll_calibrated": 0.3,
                                  "test_ece": 0.05, "test_ece_calibrated": 0.01, "unknown_threshold": 0.6,
                                  "unknown_accept_rate_test": 0.95},
                   tags={"calibration_split": "validation", "unknown_score": "energy"})
    per_class = pd.DataFrame({"class": ["cat", "dog"], "correct": [9, 8], "total": [10, 10], "accuracy": [0.9, 0.8]})
    table = pd.DataFrame({"source": ["cifar10_test", "noise", "noise"], "score": ["energy", "energy", "max_probability"],
                          "images": [20, 100, 100], "auroc": [float("nan"), 0.99, 0.5],
                          "accept_rate": [0.95, 0.02, 0.5]})
    card = model_card(CardInputs("cifar10-classifier", "3", train, evaluate, per_class, table, "d1", "p1", "cifar10"))
    for fragment in ("# cifar10-classifier v3: fast_net, `cpu` recipe", "epochs 10, optimizer muon.", "digest `abc123`", "321 s on Some CPU, 2 cores",
                     "| mirror and shift TTA | 0.9200 |", "| accuracy | 0.900 | 0.800 |", "Temperature 1.400",
                     "0.0500 → 0.0100", "Score `energy`", "| noise | 100 | 0.990 | 0.020 |", "train `t1`",
                     "## Intended use and limits"):
        assert fragment in card, fragment
    assert "| noise | 100 | 0.500" not in card  # the other score's figures stay in ood.csv
