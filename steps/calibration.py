"""The measures of calibration and of the `unknown` flag, and the fits behind them.

Plain numpy in float64 on logits evaluate already holds. The served side (applying a temperature,
the scores) is cifar_models.calibration; this module only fits and measures.
"""

import math
from dataclasses import dataclass

import numpy as np

ECE_BINS = 15  # equal-width confidence bins, as in Guo et al. 2017, so figures compare with theirs
# log T is searched over [1/20, 20]: a temperature outside is a broken model, not a calibration.
LOG_T_BOUNDS = (math.log(0.05), math.log(20.0))


def log_softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    scaled = np.asarray(logits, dtype=np.float64) / temperature
    shifted = scaled - scaled.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the true labels under softmax(logits / temperature)."""
    return float(-log_softmax(logits, temperature)[np.arange(len(labels)), labels].mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray, tol: float = 1e-5) -> float:
    """The T minimising nll(logits, labels, T), by golden-section search over log T.

    The NLL is convex in 1/T (a log-sum-exp of a linear function of it, less a linear term),
    hence unimodal in log T, so a 1-D bracketing search finds the minimum without gradients."""
    ratio = (math.sqrt(5) - 1) / 2
    lo, hi = LOG_T_BOUNDS
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = nll(logits, labels, math.exp(a)), nll(logits, labels, math.exp(b))
    while hi - lo > tol:
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = nll(logits, labels, math.exp(a))
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = nll(logits, labels, math.exp(b))
    return math.exp((lo + hi) / 2)


def cross_fit_temperatures(logits: np.ndarray, labels: np.ndarray, seed: int = 0) -> np.ndarray:
    """Per image, the temperature fitted on the other half of a random two-fold split: for
    figures on a set that is also the only one to fit on, each image scored by a T it did not shape."""
    order = np.random.default_rng(seed).permutation(len(labels))
    halves = (order[: len(order) // 2], order[len(order) // 2:])
    temperatures = np.empty(len(labels))
    for fit_on, apply_to in (halves, halves[::-1]):
        temperatures[apply_to] = fit_temperature(logits[fit_on], labels[fit_on])
    return temperatures


def softmax_per_row(logits: np.ndarray, temperatures: np.ndarray | float) -> np.ndarray:
    """softmax(logits / T) with one T for all rows, or one per row."""
    scaled = np.asarray(logits, dtype=np.float64) / np.reshape(temperatures, (-1, 1))
    scaled -= scaled.max(axis=1, keepdims=True)
    e = np.exp(scaled)
    return e / e.sum(axis=1, keepdims=True)


@dataclass(frozen=True)
class Reliability:
    """Per equal-width confidence bin: images, mean confidence and accuracy (NaN when empty)."""
    edges: np.ndarray  # bins + 1 edges from 0 to 1
    counts: np.ndarray
    confidence: np.ndarray
    accuracy: np.ndarray


def reliability(probabilities: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> Reliability:
    confidence = probabilities.max(axis=1)
    correct = (probabilities.argmax(axis=1) == labels).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    # Bins are (lo, hi], the first [0, hi]: a confidence of exactly 1 falls in the last.
    index = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    counts = np.bincount(index, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(index, confidence, minlength=bins) / counts
        accuracy = np.bincount(index, correct, minlength=bins) / counts
    return Reliability(edges, counts, mean_conf, accuracy)


def ece(probabilities: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error: the image-weighted mean over bins of |accuracy - confidence|."""
    r = reliability(probabilities, labels, bins)
    used = r.counts > 0
    return float((r.counts[used] * np.abs(r.accuracy[used] - r.confidence[used])).sum() / max(r.counts.sum(), 1))


def auroc(inside: np.ndarray, outside: np.ndarray) -> float:
    """The chance that an in-distribution image scores higher than a foreign one (ties count half):
    1 separates perfectly, 0.5 not at all. Mann-Whitney U from average ranks."""
    scores = np.concatenate([inside, outside]).astype(np.float64)
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    # Average ranks over ties: each run of equal scores gets the mean of its positions.
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    ends = np.r_[starts[1:], len(scores)]
    for start, end in zip(starts, ends):
        ranks[order[start:end]] = (start + end + 1) / 2
    n_in, n_out = len(inside), len(outside)
    u = ranks[:n_in].sum() - n_in * (n_in + 1) / 2
    return float(u / (n_in * n_out))


def accept_threshold(scores: np.ndarray, share: float) -> float:
    """The highest threshold that accepts at least `share` of these in-distribution scores: one of
    the scores itself, so the served float32 comparison gives the same answer as this one."""
    ordered = np.sort(np.asarray(scores))
    return float(ordered[min(int(math.floor(len(ordered) * (1.0 - share) + 1e-9)), len(ordered) - 1)])


def accept_rate(scores: np.ndarray, threshold: float) -> float:
    """Share of images not flagged unknown (unknown = score below the threshold)."""
    return float((np.asarray(scores) >= threshold).mean()) if len(scores) else float("nan")
