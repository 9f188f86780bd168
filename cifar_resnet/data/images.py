"""Image files: the one decoder every reader uses, and the one listing of ``<split>/<class>/<image>`` folders."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms.v2 import functional as TF

from cifar_resnet.errors import UserError

IMAGE_SIZE = 32


def decode_image(path: str | os.PathLike[str]) -> torch.Tensor:
    """Any image PIL reads, as uint8 ``(3, H, W)`` RGB.

    Palette, grey and CMYK images become RGB and alpha is dropped (PIL's ``convert``). Integer modes deeper
    than 8 bits (16-bit PNGs open as ``I;16`` or ``I``) are scaled to 8 bits instead of clipped at 255,
    which would turn them almost white.
    """
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode.startswith("I") or img.mode == "F":
                pixels = _deep_to_uint8(np.asarray(img), img.mode)
                pixels = np.repeat(pixels[..., None], 3, axis=2) if pixels.ndim == 2 else pixels
            else:
                pixels = np.asarray(img.convert("RGB"))
    except Image.DecompressionBombError as err:
        raise UserError(f"{path} is too large to decode safely ({err}); shrink or remove that image") from err
    except (OSError, SyntaxError, ValueError) as err:  # PIL's ways of saying "not an image I can read"
        raise UserError(f"cannot decode image {path} ({err}); remove or replace that file") from err
    return torch.from_numpy(np.array(pixels, dtype=np.uint8, copy=True)).permute(2, 0, 1)


def _deep_to_uint8(pixels: np.ndarray, mode: str) -> np.ndarray:
    """16-bit (or 32-bit integer, or float) grey levels to 0..255."""
    values = pixels.astype(np.float64)
    if mode == "F":
        top = 1.0 if values.max(initial=0.0) <= 1.0 else 255.0
    else:
        top = 65535.0 if mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0
    return np.clip(np.rint(values * (255.0 / top)), 0, 255).astype(np.uint8)


def to_cifar_size(image: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """``image`` resized to 32x32 (antialiased) where it is another size, and whether detail was lost."""
    h, w = image.shape[1:]
    if (h, w) == (IMAGE_SIZE, IMAGE_SIZE):
        return image, False
    return TF.resize(image, [IMAGE_SIZE, IMAGE_SIZE], antialias=True), h > IMAGE_SIZE or w > IMAGE_SIZE


def _walk_files(folder: Path, seen: set[tuple[int, int]]) -> list[Path]:
    """Every file under ``folder``, symbolic links followed; a link loop or a broken link is a UserError."""
    stat = folder.stat()
    if (stat.st_dev, stat.st_ino) in seen:
        raise UserError(f"{folder} is a symbolic link loop (it leads back to a folder above it); remove the link")
    seen = seen | {(stat.st_dev, stat.st_ino)}
    files: list[Path] = []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_symlink() and not entry.exists():
            target = os.readlink(entry)
            raise UserError(f"{entry} is a broken symbolic link (to {target}); remove it or restore its target")
        if entry.is_dir():
            files += _walk_files(entry, seen)
        elif entry.is_file():
            files.append(entry)
    return files


def class_names(split_dir: Path) -> list[str]:
    """The class folders of ``split_dir``, sorted (hidden folders such as ``.ipynb_checkpoints`` left out).

    A link among them that leads nowhere (a broken link or a link loop) is a UserError: leaving it out would
    train on one class fewer without a word.
    """
    names = []
    for entry in split_dir.iterdir():
        if entry.name.startswith("."):
            continue
        if entry.is_symlink() and not entry.exists():
            raise UserError(f"class folder {entry} {_dead_link(entry)}")
        if entry.is_dir():
            names.append(entry.name)
    return sorted(names)


def _dead_link(link: Path) -> str:
    """What is wrong with a symbolic link that does not lead to a file or folder."""
    try:
        link.stat()
    except OSError as err:
        if err.errno == errno.ELOOP:
            return "is a symbolic link loop (it leads back to itself); remove the link"
    return f"is a broken symbolic link (to {os.readlink(link)}); remove it or restore its target"


def list_image_folder(split_dir: Path) -> tuple[list[tuple[str, int]], list[str]]:
    """``(path, label)`` of every image under ``split_dir/<class>/``, and the class names (sorted, as
    torchvision's ImageFolder orders them). Files that are not images by their suffix are left out."""
    if not split_dir.is_dir():
        raise UserError(f"{split_dir} is not a directory; expected {split_dir}/<class>/<image>.png|jpg")
    classes = class_names(split_dir)
    if not classes:
        raise UserError(f"{split_dir} has no class folders; expected {split_dir}/<class>/<image>.png|jpg")
    if len(classes) == 1:
        raise UserError(
            f"{split_dir} has one class folder ({classes[0]}); a classifier needs two or more, as "
            f"{split_dir}/<class>/<image>.png|jpg"
        )
    samples: list[tuple[str, int]] = []
    empty = []
    for label, name in enumerate(classes):
        images = [p for p in _walk_files(split_dir / name, set()) if p.suffix.lower() in IMG_EXTENSIONS]
        if not images:
            empty.append(name)
        samples += [(str(p), label) for p in images]
    if empty:
        raise UserError(
            f"{split_dir}: no images ({', '.join(IMG_EXTENSIONS)}) in class folder{'s' if len(empty) > 1 else ''} "
            f"{', '.join(empty)}; add images or remove the folder"
        )
    return samples, classes
