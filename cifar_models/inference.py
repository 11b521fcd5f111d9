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


@torch.inference_mode()
def predict_logits(model: torch.nn.Module, images: np.ndarray | torch.Tensor, mean: Sequence[float],
                   std: Sequence[float], batch_size: int = 512, flip_tta: bool = False) -> torch.Tensor:
    """Float32 logits on the CPU for (N, 32, 32, 3) uint8 images, in batches.

    With flip_tta the logits are the mean over each image and its mirror image.
    """
    device = next(model.parameters()).device
    chunks = []
    for start in range(0, len(images), batch_size):
        batch = to_nchw(images[start:start + batch_size]).to(device, non_blocking=True)
        x = normalize(batch, mean, std)
        logits = model(x).float()
        if flip_tta:
            logits = (logits + model(x.flip(-1)).float()) / 2
        chunks.append(logits.cpu())
    if not chunks:
        return torch.empty(0, len(CLASSES))
    return torch.cat(chunks)
