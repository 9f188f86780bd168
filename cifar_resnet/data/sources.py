"""Where images come from: torchvision's CIFAR-10 files or an image-folder tree, decoded once to uint8.

Both sources end as an :class:`ImageSplit`: a ``(N, 3, 32, 32)`` uint8 tensor and ``(N,)`` int64 labels.
Decoding 50,000 JPEGs takes seconds, so image-folder splits are cached as one tensor file keyed by the
file list (paths, sizes, modification times); a second run loads the cache instead.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torchvision.datasets import CIFAR10

from cifar_resnet.data.images import IMAGE_SIZE, decode_image, list_image_folder, to_cifar_size
from cifar_resnet.errors import UserError
from cifar_resnet.fileio import atomic_torch_save

CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
# Per-channel mean and std of the 50,000 CIFAR-10 training images (the values the field uses).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
SourceKind = Literal["imagefolder", "cifar10"]
_CACHE_FORMAT = 2  # 2: the file paths are cached too


@dataclass(frozen=True)
class ImageSplit:
    """One split of a dataset, fully decoded: uint8 images ``(N, 3, 32, 32)`` and int64 labels ``(N,)``."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]
    sources: tuple[str, ...] | None = None  # where each image came from: a file path, or a batch file and index

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4 or self.images.shape[1] != 3:
            raise ValueError(f"images must be uint8 (N, 3, H, W), got {self.images.dtype} {self.images.shape}")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError("labels must have one entry per image")
        if self.sources is not None and len(self.sources) != self.images.shape[0]:
            raise ValueError("sources must have one entry per image")

    def __len__(self) -> int:
        return self.images.shape[0]

    def subset(self, indices: torch.Tensor) -> ImageSplit:
        """The images at ``indices`` (a copy), with the same class names."""
        sources = tuple(self.sources[i] for i in indices.tolist()) if self.sources is not None else None
        return ImageSplit(self.images[indices].contiguous(), self.labels[indices].contiguous(), self.classes, sources)


def default_cache_dir() -> Path:
    """``$CIFAR_RESNET_CACHE``, else ``$XDG_CACHE_HOME/cifar_resnet``, else ``~/.cache/cifar_resnet``."""
    if "CIFAR_RESNET_CACHE" in os.environ:
        return Path(os.environ["CIFAR_RESNET_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "cifar_resnet"


def detect_source(data_dir: str | os.PathLike[str]) -> SourceKind:
    """``"imagefolder"`` when ``data_dir/train`` exists, else ``"cifar10"`` (torchvision's files)."""
    return "imagefolder" if (Path(data_dir) / "train").is_dir() else "cifar10"


def check_data_dir(data_dir: str | os.PathLike[str], may_download: bool) -> None:
    """Refuse a ``--data_dir`` that holds neither layout, before anything is downloaded or written.

    CIFAR-10 is downloaded only where ``may_download`` (the default folder): a mistyped path should be an
    error, not a 170 MB download into a new folder.
    """
    root = Path(data_dir)
    if detect_source(root) == "imagefolder" or cifar10_files_present(root) or may_download:
        return
    if not root.exists():
        raise UserError(f"--data_dir {root} does not exist")
    if not root.is_dir():
        raise UserError(f"--data_dir {root} is not a directory")
    if (root / CIFAR10.base_folder).is_dir():
        raise UserError(
            f"--data_dir {root}: {CIFAR10.base_folder} lacks some CIFAR-10 batch files; copy all of them there"
        )
    what = "is empty" if not any(root.iterdir()) else "holds neither train/<class>/<image> nor CIFAR-10 files"
    raise UserError(
        f"--data_dir {root} {what}; expected {root}/train/<class>/*.png|jpg or {root}/{CIFAR10.base_folder}/"
    )


# --------------------------------------------------------------------------------------------------
# torchvision CIFAR-10


class _CIFAR10AnyFiles(CIFAR10):
    """torchvision's CIFAR10 reader without the MD5 check on load.

    torchvision verifies MD5 sums when it downloads; on load we accept any files in the same pickled
    format (a re-packed subset, or files a test generated), and report unreadable ones clearly instead.
    """

    train_list = [[name, None] for name, _ in CIFAR10.train_list]  # noqa: RUF012
    test_list = [[name, None] for name, _ in CIFAR10.test_list]  # noqa: RUF012
    meta = {**CIFAR10.meta, "md5": None}  # noqa: RUF012


def cifar10_files_present(root: str | os.PathLike[str]) -> bool:
    """True when every CIFAR-10 batch file torchvision expects is under ``root``."""
    base = Path(root) / CIFAR10.base_folder
    names = [n for n, _ in CIFAR10.train_list + CIFAR10.test_list] + [CIFAR10.meta["filename"]]
    return all((base / n).is_file() for n in names)


def download_cifar10(root: str | os.PathLike[str]) -> None:
    """Download CIFAR-10 with torchvision (MD5-checked) unless its files are already there."""
    if cifar10_files_present(root):
        return
    try:
        CIFAR10(str(root), train=True, download=True)
    except Exception as err:  # network errors come in many types; all mean the same to the user
        raise UserError(
            f"could not download CIFAR-10 into {root} ({err}); download it elsewhere and copy "
            f"'{CIFAR10.base_folder}' there, or pass --data_dir DIR with DIR/train/<class>/*.png"
        ) from err


def load_cifar10(root: str | os.PathLike[str], train: bool) -> ImageSplit:
    """Read torchvision's CIFAR-10 batch files under ``root`` into an :class:`ImageSplit`."""
    if not cifar10_files_present(root):
        raise UserError(
            f"no CIFAR-10 files in {Path(root) / CIFAR10.base_folder}; let the run download them "
            "(internet needed) or pass --data_dir DIR with DIR/train/<class>/*.png"
        )
    try:
        ds = _CIFAR10AnyFiles(str(root), train=train, download=False)
        data = np.asarray(ds.data, dtype=np.uint8)
        labels = torch.as_tensor(ds.targets, dtype=torch.int64)
    except Exception as err:  # pickle raises several types on truncated or foreign files
        raise UserError(
            f"CIFAR-10 files in {Path(root) / CIFAR10.base_folder} are unreadable ({type(err).__name__}: "
            f"{err}); delete that folder and download again"
        ) from err
    if data.ndim != 4 or data.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 3) or len(data) != len(labels):
        raise UserError(f"CIFAR-10 files in {root} have an unexpected shape {data.shape}; download them again")
    images = torch.from_numpy(data).permute(0, 3, 1, 2).contiguous()
    split = "train" if train else "test"
    sources = tuple(f"{Path(root) / CIFAR10.base_folder}:{split}#{i}" for i in range(len(labels)))
    return ImageSplit(images, labels, tuple(ds.classes), sources)


# --------------------------------------------------------------------------------------------------
# Image folders


def _cache_key(split_dir: Path, samples: list[tuple[str, int]], classes: list[str]) -> str:
    digest = hashlib.sha256(f"format={_CACHE_FORMAT};classes={','.join(classes)}\n".encode())
    for path, label in samples:
        st = os.stat(path)
        rel = os.path.relpath(path, split_dir)
        digest.update(f"{rel}\t{label}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:24]


def _decode_files(paths: list[str]) -> list[torch.Tensor]:
    """Decode images in threads (PIL releases the GIL while it decodes)."""
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return list(pool.map(decode_image, paths, chunksize=256))


def _to_cifar_size(images: list[torch.Tensor], paths: list[str]) -> torch.Tensor:
    resized = []
    for i, image in enumerate(images):
        images[i], _ = to_cifar_size(image)
        if image.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
            resized.append(i)
    if resized:
        warnings.warn(
            f"{len(resized)} of {len(paths)} images are not {IMAGE_SIZE}x{IMAGE_SIZE} and were resized "
            f"(first: {paths[resized[0]]})",
            stacklevel=3,
        )
    return torch.stack(images)


def load_image_folder(split_dir: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None) -> ImageSplit:
    """Decode ``split_dir/<class>/*`` into an :class:`ImageSplit`, through a cache when ``cache_dir`` is set."""
    split_dir = Path(split_dir)
    samples, classes = list_image_folder(split_dir)
    cache_file = None
    if cache_dir is not None:
        cache_file = Path(cache_dir) / f"imagefolder-{split_dir.name}-{_cache_key(split_dir, samples, classes)}.pt"
        if cache_file.is_file():
            try:
                cached = torch.load(cache_file, map_location="cpu", weights_only=True)
                return ImageSplit(cached["images"], cached["labels"], tuple(cached["classes"]), tuple(cached["paths"]))
            except Exception:  # a damaged cache is only a lost shortcut: decode again and rewrite it
                cache_file.unlink(missing_ok=True)
    paths = [p for p, _ in samples]
    images = _to_cifar_size(_decode_files(paths), paths)
    labels = torch.tensor([label for _, label in samples], dtype=torch.int64)
    split = ImageSplit(images, labels, tuple(classes), tuple(paths))
    if cache_file is not None:
        try:
            atomic_torch_save({"images": split.images, "labels": split.labels, "classes": list(classes),
                               "paths": paths}, cache_file)  # fmt: skip
        except OSError as err:
            warnings.warn(f"could not write the decoded-image cache {cache_file}: {err}", stacklevel=2)
    return split
