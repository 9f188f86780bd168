"""CIFAR-10/100 and image-folder data: sources decoded once to uint8, a stratified split, augmentation, the DataModule.

Importing this package does not import Lightning; ``CIFARDataModule`` is loaded on first use.
"""

from typing import Any

from cifar_resnet.data.augment import BatchAugment, Normalize
from cifar_resnet.data.sources import CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD, ImageSplit, detect_source
from cifar_resnet.data.split import stratified_split

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "BatchAugment",
    "CIFARDataModule",
    "ImageSplit",
    "Normalize",
    "detect_source",
    "stratified_split",
]


def __getattr__(name: str) -> Any:
    if name == "CIFARDataModule":
        from cifar_resnet.data.datamodule import CIFARDataModule

        return CIFARDataModule
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
