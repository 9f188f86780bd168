"""ResNets on CIFAR-10 with PyTorch Lightning.

>>> from cifar_resnet import create_model, list_models, load_model   # plain torch
>>> from cifar_resnet import ImageClassifier, CIFARDataModule         # Lightning, imported on first use

``load_model(path)`` turns a checkpoint or an exported file into a model of RGB images in [0, 1].
Importing the package changes no global setting (matplotlib backend, logging, warnings).
"""

from typing import Any

from cifar_resnet.models import create_model, list_models
from cifar_resnet.tools.inference import load_model

__version__ = "0.1.0"

__all__ = [
    "CIFARDataModule",
    "DataConfig",
    "ImageClassifier",
    "ModelConfig",
    "TrainerConfig",
    "__version__",
    "create_model",
    "list_models",
    "load_model",
]

_LAZY = {
    "ImageClassifier": "cifar_resnet.training.module",
    "CIFARDataModule": "cifar_resnet.data.datamodule",
    "ModelConfig": "cifar_resnet.config",
    "DataConfig": "cifar_resnet.config",
    "TrainerConfig": "cifar_resnet.config",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
