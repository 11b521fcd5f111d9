"""Architectures by name, so that a config, a run parameter or a served model can name one.

The architecture modules register themselves when imported; this module imports none of
them (they import it), so importing the package is what fills the registry.
"""

from collections.abc import Callable

import torch
from torch import nn

ModelBuilder = Callable[..., nn.Module]

_MODELS: dict[str, ModelBuilder] = {}


def register_model(fn: ModelBuilder) -> ModelBuilder:
    """Record `fn` under its own name. A second builder under the same name is refused
    rather than silently shadowing the first: a run logged under that name must always
    rebuild the same network."""
    name = fn.__name__
    if name in _MODELS:
        raise ValueError(f"model {name!r} is already registered")
    _MODELS[name] = fn
    return fn


def create_model(name: str, num_classes: int = 10) -> nn.Module:
    """A freshly initialised model, on the CPU whatever the default device; the caller
    moves it to its device and precision."""
    try:
        builder = _MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(list_models())}") from None
    with torch.device("cpu"):
        return builder(num_classes=num_classes)


def list_models() -> list[str]:
    return sorted(_MODELS)
