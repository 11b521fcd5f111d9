"""CIFAR-10 networks and what inference needs: the registry, the architectures, the shared
preprocessing, the served model and its batching server (server.py, which alone needs litserve).
Ships as the code of every registered model, so it holds no training or tracking code."""

from cifar_models import fast_net, resnet, separable_net  # noqa: F401  (importing registers them)
from cifar_models.preprocess import CIFAR10_MEAN, CIFAR10_STD, CLASSES, normalize, to_nchw
from cifar_models.registry import create_model, list_models, register_model
from cifar_models.summary import summary

__all__ = [
    "CIFAR10_MEAN", "CIFAR10_STD", "CLASSES", "create_model", "list_models", "normalize",
    "register_model", "summary", "to_nchw",
]
