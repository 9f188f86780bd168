"""The top-k classes of image files of any size, from a checkpoint."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torchvision.datasets.folder import IMG_EXTENSIONS

from cifar_resnet.data.images import decode_image, to_cifar_size
from cifar_resnet.errors import UserError
from cifar_resnet.tools.inference import auto_device, load_trained_model, predict_logits_and_probs


@dataclass
class Prediction:
    """The top-k classes of one image, most probable first."""

    path: str
    classes: list[str]
    probs: list[float]


def find_images(inputs: Sequence[str]) -> list[Path]:
    """Files as given, and every image file under given folders (sorted, recursive)."""
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS)
        elif path.is_file():
            found.append(path)
        else:
            raise UserError(f"{item}: no such file or directory")
    if not found:
        raise UserError(f"no image files ({', '.join(IMG_EXTENSIONS)}) in {', '.join(inputs)}")
    return found


def predict_files(
    ckpt_path: str | Path, inputs: Sequence[str], topk: int = 3, batch_size: int = 256
) -> tuple[list[Prediction], list[Path]]:
    """Top-k predictions for every image, batched; also the files that were downscaled (detail lost)."""
    trained = load_trained_model(ckpt_path).to(auto_device())
    paths = find_images(inputs)
    k = max(1, min(topk, trained.num_classes))
    predictions: list[Prediction] = []
    downscaled: list[Path] = []
    for start in range(0, len(paths), batch_size):
        chunk = paths[start : start + batch_size]
        loaded = [to_cifar_size(decode_image(p)) for p in chunk]
        downscaled += [p for p, (_, lossy) in zip(chunk, loaded, strict=True) if lossy]
        _, probs = predict_logits_and_probs(trained, torch.stack([img for img, _ in loaded]), batch_size=batch_size)
        top = probs.topk(k, dim=1)
        for path, values, indices in zip(chunk, top.values.tolist(), top.indices.tolist(), strict=True):
            predictions.append(Prediction(str(path), [trained.classes[i] for i in indices], values))
    return predictions, downscaled
