"""CIFAR-10 data: sources decoded once to uint8 tensors, a stratified split, batch augmentation, the DataModule."""

from cifar_resnet.data.augment import BatchAugment, Normalize
from cifar_resnet.data.datamodule import CIFAR10_MEAN, CIFAR10_STD, CIFARDataModule
from cifar_resnet.data.sources import ImageSplit, detect_source
from cifar_resnet.data.split import stratified_split

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "BatchAugment",
    "CIFARDataModule",
    "ImageSplit",
    "Normalize",
    "detect_source",
    "stratified_split",
]
