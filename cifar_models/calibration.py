"""What the served model does to the network's logits: temperature scaling, and the `unknown` flag.

A network's raw softmax rarely matches how often it is right: plain cross-entropy tends to make
it over-confident, label smoothing under-confident (the cpu recipe's model fits T = 0.53,
benchmarks/README.md, "Calibration"). Dividing the logits by one temperature T, fitted on images
the network never trained on, makes the probabilities match the observed accuracy without
changing any argmax.
An image is called `unknown` (probably not one of the classes) when its score, a measure of how
in-distribution the calibrated output looks, falls below a threshold set so that a stated share
of held-out in-distribution images pass. evaluate fits all of it (steps/calibration.py) and
ships it beside the weights as calibration.json; a model without the file serves the raw
softmax (T = 1) and never says unknown.
"""

import json
from dataclasses import asdict, dataclass

import torch

CALIBRATION_FILE = "calibration.json"
# Both are "higher = more like the training classes". max_probability: the top calibrated
# probability. energy: T * logsumexp(logits / T), the negative free energy, which keeps how
# large the logits are (the softmax throws that away) and often separates foreign images better.
SCORES = ("max_probability", "energy")


@dataclass(frozen=True)
class Calibration:
    temperature: float = 1.0  # the logits are divided by it before the softmax
    score: str = "max_probability"  # one of SCORES
    threshold: float | None = None  # an image scoring below it is unknown; None = never unknown
    accept_share: float = 1.0  # share of held-out in-distribution images the threshold was set to accept

    @classmethod
    def from_json(cls, text: str) -> "Calibration":
        raw = json.loads(text)
        calibration = cls(temperature=float(raw["temperature"]), score=raw["score"],
                          threshold=None if raw.get("threshold") is None else float(raw["threshold"]),
                          accept_share=float(raw.get("accept_share", 1.0)))
        if calibration.score not in SCORES or not calibration.temperature > 0:
            raise ValueError(f"bad calibration {raw}: score must be one of {SCORES}, temperature > 0")
        return calibration

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def calibrated_probabilities(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.softmax(logits.float() / temperature, dim=1)


def ood_scores(logits: torch.Tensor, temperature: float, score: str) -> torch.Tensor:
    """One score per image, higher = more like the training classes (see SCORES)."""
    scaled = logits.float() / temperature
    if score == "max_probability":
        return torch.softmax(scaled, dim=1).max(dim=1).values
    if score == "energy":
        return temperature * torch.logsumexp(scaled, dim=1)
    raise ValueError(f"unknown score {score!r}; known: {', '.join(SCORES)}")


def unknown_flags(logits: torch.Tensor, calibration: Calibration) -> torch.Tensor:
    if calibration.threshold is None:
        return torch.zeros(len(logits), dtype=torch.bool)
    return ood_scores(logits, calibration.temperature, calibration.score) < calibration.threshold
