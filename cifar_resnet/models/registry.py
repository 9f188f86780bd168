"""Name -> builder registry behind :func:`create_model` and :func:`list_models`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

ModelBuilder = Callable[..., nn.Module]
BuilderT = TypeVar("BuilderT", bound=ModelBuilder)


class ModelRegistry:
    """A mapping of unique architecture names to builder functions."""

    def __init__(self) -> None:
        self._builders: dict[str, ModelBuilder] = {}

    def register(self, builder: BuilderT) -> BuilderT:
        """Decorator: register ``builder`` under its ``__name__``; duplicate names raise ``ValueError``."""
        name = builder.__name__
        if name in self._builders:
            raise ValueError(f"model {name!r} is already registered")
        self._builders[name] = builder
        return builder

    def names(self) -> list[str]:
        """All registered names in registration order: family by family, shallow to deep."""
        return list(self._builders)

    def create(self, arch: str, num_classes: int = 10, **kwargs: Any) -> nn.Module:
        """Build ``arch`` with a ``num_classes``-way linear head; extra kwargs go to the builder."""
        builder = self._builders.get(arch)
        if builder is None:
            raise ValueError(f"unknown model {arch!r}; known models: {', '.join(self.names())}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        return builder(num_classes=num_classes, **kwargs)

    def __contains__(self, arch: object) -> bool:
        return arch in self._builders


MODELS = ModelRegistry()
register_model = MODELS.register


def create_model(arch: str, num_classes: int = 10, **kwargs: Any) -> nn.Module:
    """Build a registered model by name; an unknown name raises ``ValueError`` listing the known ones."""
    return MODELS.create(arch, num_classes=num_classes, **kwargs)


def list_models() -> list[str]:
    """Names of every registered model, family by family, shallow to deep (``resnet20`` before ``resnet110``)."""
    return MODELS.names()
