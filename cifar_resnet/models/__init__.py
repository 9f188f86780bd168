"""Model registry: ``create_model(arch, num_classes)`` and ``list_models()``.

Importing this package registers every architecture. It depends on torch/torchvision only.
"""

from . import imagenet_style, cifar_style  # noqa: F401, I001  (imports register the builders, in this order)
from .registry import MODELS, ModelRegistry, create_model, list_models, register_model

__all__ = ["MODELS", "ModelRegistry", "create_model", "list_models", "register_model"]
