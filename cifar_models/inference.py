"""A trained network on disk and the one forward path that evaluation and serving share.

A trained model is two files: the weights (a plain `state_dict`, which loads with
`torch.load(..., weights_only=True)` and so can never run code) and a small JSON spec naming
the architecture and the normalisation the network was trained with.
"""

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from cifar_models.preprocess import CLASSES, normalize, to_nchw
from cifar_models.registry import create_model

WEIGHTS_FILE = "state_dict.pt"
SPEC_FILE = "model_config.json"


@dataclass(frozen=True)
class ModelSpec:
    model: str  # name in the cifar_models registry
    mean: tuple[float, float, float]  # per-channel statistics the network was trained with
    std: tuple[float, float, float]
    classes: tuple[str, ...] = CLASSES  # output index -> class name

    @classmethod
    def from_json(cls, text: str) -> "ModelSpec":
        raw = json.loads(text)
        return cls(model=raw["model"], mean=tuple(raw["mean"]), std=tuple(raw["std"]), classes=tuple(raw["classes"]))

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def save_network(model: torch.nn.Module, spec: ModelSpec, folder: Path) -> Path:
    """Write the weights and the spec into folder (created if needed); returns folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save(state, folder / WEIGHTS_FILE)
    (folder / SPEC_FILE).write_text(spec.to_json())
    return folder


def load_network(folder: Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, ModelSpec]:
    """The network saved by save_network, in eval mode on `device`."""
    folder = Path(folder)
    spec = ModelSpec.from_json((folder / SPEC_FILE).read_text())
    model = create_model(spec.model, num_classes=len(spec.classes))
    state = torch.load(folder / WEIGHTS_FILE, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.to(device).eval(), spec


TTA_MODES = ("none", "flip", "flip_shift")


def _tta_logits(model: torch.nn.Module, x: torch.Tensor, tta: str) -> torch.Tensor:
    """Float32 logits of normalised batch x, averaged over the views `tta` names.

    flip: the image and its mirror, equal weights. flip_shift (airbench94's level 2): half the
    weight on that pair, and a quarter each on the pairs of two translated copies, one moved by
    a pixel up and left and one by a pixel down and right, both cut from the image padded by
    one pixel with reflection (so no black border appears that training never showed).
    """
    def with_mirror(v: torch.Tensor) -> torch.Tensor:
        return (model(v).float() + model(v.flip(-1)).float()) / 2

    if tta == "none":
        return model(x).float()
    if tta == "flip":
        return with_mirror(x)
    h, w = x.shape[-2:]
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
    shifted = (with_mirror(padded[..., :h, :w]) + with_mirror(padded[..., 2:, 2:])) / 2
    return (with_mirror(x) + shifted) / 2


@torch.inference_mode()
def predict_logits(model: torch.nn.Module, images: np.ndarray | torch.Tensor, mean: Sequence[float],
                   std: Sequence[float], batch_size: int = 512, tta: str = "none") -> torch.Tensor:
    """Float32 logits on the CPU for (N, 32, 32, 3) uint8 images, in batches.

    tta: "none" (one forward per image; what the served model uses, as its latency budget is
    one forward), "flip" (mean over the image and its mirror: 2
    forwards) or "flip_shift" (also one-pixel translations: 6 forwards); see _tta_logits.
    """
    if tta not in TTA_MODES:
        raise ValueError(f"unknown tta {tta!r}; known: {', '.join(TTA_MODES)}")
    device = next(model.parameters()).device
    chunks = []
    for start in range(0, len(images), batch_size):
        batch = to_nchw(images[start:start + batch_size]).to(device, non_blocking=True)
        chunks.append(_tta_logits(model, normalize(batch, mean, std), tta).cpu())
    if not chunks:
        return torch.empty(0, len(CLASSES))
    return torch.cat(chunks)
