"""Dataset statistics: per-class counts of each split and per-channel normalisation statistics."""

from __future__ import annotations

import torch

from cifar_resnet.data.datamodule import CIFARDataModule
from cifar_resnet.data.sources import ImageSplit


def channel_mean_std(images: torch.Tensor, chunk: int = 4096) -> tuple[list[float], list[float]]:
    """Per-channel mean and (population) std of uint8 ``(N, 3, H, W)`` images in [0, 1].

    Accumulated in float64 chunks, so 50,000 images need neither a float copy of the set nor precision luck.
    """
    channels = images.shape[1]
    total = torch.zeros(channels, dtype=torch.float64)
    total_sq = torch.zeros(channels, dtype=torch.float64)
    for start in range(0, images.shape[0], chunk):
        x = images[start : start + chunk].to(torch.float64).div_(255.0)
        total += x.sum(dim=(0, 2, 3))
        total_sq += x.square().sum(dim=(0, 2, 3))
    n = max(1, images.shape[0] * images.shape[2] * images.shape[3])
    mean = total / n
    std = (total_sq / n - mean.square()).clamp_min(0).sqrt()
    return mean.tolist(), std.tolist()


def class_counts(split: ImageSplit | None, num_classes: int) -> list[int] | None:
    return torch.bincount(split.labels, minlength=num_classes).tolist() if split is not None else None


def describe_data(datamodule: CIFARDataModule) -> str:
    """A table of images per class in train, validation and test, and the training split's mean/std."""
    datamodule.setup("fit")
    classes = datamodule.classes
    columns = {
        name: class_counts(getattr(datamodule, f"{name}_split"), len(classes)) for name in ("train", "val", "test")
    }
    if datamodule.config.val_size == 0:
        columns["val"] = None  # validation is the test split itself; counting it twice would mislead
    width = max(len("total"), *(len(c) for c in classes))
    header = f"{'class':<{width}}  {'train':>7}  {'val':>7}  {'test':>7}"
    lines = [f"data: {datamodule.describe()}", "", header, "-" * len(header)]

    def cell(name: str, k: int | None) -> str:
        counts = columns[name]
        if counts is None:
            return f"{'-':>7}"
        return f"{sum(counts) if k is None else counts[k]:>7}"

    for k, name in enumerate(classes):
        lines.append(f"{name:<{width}}  {cell('train', k)}  {cell('val', k)}  {cell('test', k)}")
    lines.append("-" * len(header))
    lines.append(f"{'total':<{width}}  {cell('train', None)}  {cell('val', None)}  {cell('test', None)}")
    if datamodule.config.val_size == 0:
        lines.append("(--val_size 0: validation uses the test split)")
    mean, std = channel_mean_std(datamodule.train_split.images)
    lines += [
        "",
        "per-channel statistics of the training split (pixels in [0, 1], R G B):",
        f"  mean  {' '.join(f'{v:.4f}' for v in mean)}",
        f"  std   {' '.join(f'{v:.4f}' for v in std)}",
        f"  (training normalises with {' '.join(f'{v:.4f}' for v in datamodule.normalize.mean.flatten().tolist())}"
        f" / {' '.join(f'{v:.4f}' for v in datamodule.normalize.std.flatten().tolist())})",
    ]
    return "\n".join(lines)
