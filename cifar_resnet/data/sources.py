"""Where images come from: torchvision's CIFAR-10 or CIFAR-100 files or an image-folder tree, decoded once to uint8.

Every source ends as an :class:`ImageSplit`: a ``(N, 3, 32, 32)`` uint8 tensor and ``(N,)`` int64 labels.
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
from torchvision.datasets import CIFAR10, CIFAR100

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
# Per-channel mean and (population) std of the 50,000 CIFAR-100 training images, as computed and published in
# weiaicunzai/pytorch-cifar100 (conf/global_settings.py: 0.50708, 0.48655, 0.44092 / 0.26733, 0.25644, 0.27615),
# rounded to four places; ``fit.py --dataset cifar100 --describe_data`` recomputes them from the files.
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
SourceKind = Literal["imagefolder", "cifar10", "cifar100"]
DATASETS: tuple[str, ...] = ("cifar10", "cifar100", "imagefolder")
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


def resolve_dataset(dataset: str, data_dir: str | os.PathLike[str]) -> SourceKind:
    """``--dataset``: ``auto`` is today's choice by layout (:func:`detect_source`), any other name is itself."""
    if dataset == "auto":
        return detect_source(data_dir)
    if dataset not in DATASETS:
        raise UserError(f"--dataset must be one of auto, {', '.join(DATASETS)}, got {dataset!r}")
    return dataset  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------------
# torchvision's CIFAR-10 and CIFAR-100


def _without_md5(reader: type[CIFAR10]) -> type[CIFAR10]:
    """torchvision's reader without the MD5 check on load.

    torchvision verifies MD5 sums when it downloads; on load we accept any files in the same pickled
    format (a re-packed subset, or files a test generated), and report unreadable ones clearly instead.
    """
    return type(
        f"_{reader.__name__}AnyFiles",
        (reader,),
        {
            "train_list": [[name, None] for name, _ in reader.train_list],
            "test_list": [[name, None] for name, _ in reader.test_list],
            "meta": {**reader.meta, "md5": None},
        },
    )


@dataclass(frozen=True)
class TorchvisionSet:
    """One of torchvision's CIFAR data sets on disk: its reader (which knows the file names and the pickled
    format, so nothing here re-implements them), its name, and the statistics batches are normalised with."""

    name: SourceKind
    title: str
    reader: type[CIFAR10]
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def base_folder(self) -> str:
        return self.reader.base_folder

    def file_names(self) -> list[str]:
        return [n for n, _ in self.reader.train_list + self.reader.test_list] + [self.reader.meta["filename"]]


TORCHVISION_SETS: dict[str, TorchvisionSet] = {
    "cifar10": TorchvisionSet("cifar10", "CIFAR-10", CIFAR10, 10, CIFAR10_MEAN, CIFAR10_STD),
    "cifar100": TorchvisionSet("cifar100", "CIFAR-100", CIFAR100, 100, CIFAR100_MEAN, CIFAR100_STD),
}


def files_present(root: str | os.PathLike[str], dataset: str = "cifar10") -> bool:
    """True when every file torchvision's reader of ``dataset`` expects is under ``root``."""
    spec = TORCHVISION_SETS[dataset]
    base = Path(root) / spec.base_folder
    return all((base / n).is_file() for n in spec.file_names())


def cifar10_files_present(root: str | os.PathLike[str]) -> bool:
    """True when every CIFAR-10 batch file torchvision expects is under ``root``."""
    return files_present(root, "cifar10")


def check_data_dir(data_dir: str | os.PathLike[str], may_download: bool, dataset: str = "auto") -> None:
    """Refuse a ``--data_dir`` that does not hold ``--dataset``, before anything is downloaded or written.

    torchvision's sets are downloaded only where ``may_download`` (``--download``, or the default folder): a
    mistyped path should be an error, not a download of hundreds of MB into a new folder.
    """
    root = Path(data_dir)
    kind = resolve_dataset(dataset, root)
    if kind == "imagefolder":
        if dataset == "imagefolder" and not (root / "train").is_dir():
            raise UserError(f"--dataset imagefolder: {root}/train/<class>/*.png|jpg is missing")
        return
    if files_present(root, kind) or may_download:
        return
    spec = TORCHVISION_SETS[kind]
    if root.exists() and not root.is_dir():
        raise UserError(f"--data_dir {root} is not a directory")
    if (root / spec.base_folder).is_dir():
        raise UserError(
            f"--data_dir {root}: {spec.base_folder} lacks some {spec.title} files; copy all of them there, or add "
            "--download to fetch them again"
        )
    if dataset == "auto" and root.is_dir() and any(root.iterdir()):
        raise UserError(
            f"--data_dir {root} holds neither train/<class>/<image> nor CIFAR-10 files; expected "
            f"{root}/train/<class>/*.png|jpg or {root}/{spec.base_folder}/ (add --download to fetch CIFAR-10)"
        )
    where = "does not exist" if not root.exists() else "is empty" if not any(root.iterdir()) else "lacks it"
    raise UserError(
        f"--data_dir {root} {where}: no {spec.title} files in {root / spec.base_folder}; add --download to fetch "
        f"{spec.title} there (internet needed), or pass the folder that holds {spec.base_folder}/"
    )


def download(root: str | os.PathLike[str], dataset: str = "cifar10") -> None:
    """Download ``dataset`` with torchvision (MD5-checked) unless its files are already there."""
    if files_present(root, dataset):
        return
    spec = TORCHVISION_SETS[dataset]
    try:
        spec.reader(str(root), train=True, download=True)
    except Exception as err:  # network errors come in many types; all mean the same to the user
        raise UserError(
            f"could not download {spec.title} into {root} ({err}); download it elsewhere and copy "
            f"'{spec.base_folder}' there, or pass --data_dir DIR with DIR/train/<class>/*.png"
        ) from err


def download_cifar10(root: str | os.PathLike[str]) -> None:
    """Download CIFAR-10 with torchvision (MD5-checked) unless its files are already there."""
    download(root, "cifar10")


def load_torchvision(root: str | os.PathLike[str], train: bool, dataset: str = "cifar10") -> ImageSplit:
    """Read torchvision's ``dataset`` files under ``root`` into an :class:`ImageSplit` (CIFAR-100: the 100 fine
    labels and their names, as torchvision reads them)."""
    spec = TORCHVISION_SETS[dataset]
    folder = Path(root) / spec.base_folder
    if not files_present(root, dataset):
        raise UserError(
            f"no {spec.title} files in {folder}; add --download to fetch them (internet needed) or pass "
            "--data_dir DIR with DIR/train/<class>/*.png"
        )
    try:
        ds = _without_md5(spec.reader)(str(root), train=train, download=False)
        data = np.asarray(ds.data, dtype=np.uint8)
        labels = torch.as_tensor(ds.targets, dtype=torch.int64)
    except Exception as err:  # pickle raises several types on truncated or foreign files
        raise UserError(
            f"{spec.title} files in {folder} are unreadable ({type(err).__name__}: {err}); delete that folder and "
            "download again"
        ) from err
    if data.ndim != 4 or data.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 3) or len(data) != len(labels):
        raise UserError(f"{spec.title} files in {root} have an unexpected shape {data.shape}; download them again")
    if len(ds.classes) != spec.num_classes:
        raise UserError(f"{spec.title} files in {folder} name {len(ds.classes)} classes, not {spec.num_classes}")
    images = torch.from_numpy(data).permute(0, 3, 1, 2).contiguous()
    split = "train" if train else "test"
    sources = tuple(f"{folder}:{split}#{i}" for i in range(len(labels)))
    return ImageSplit(images, labels, tuple(ds.classes), sources)


def load_cifar10(root: str | os.PathLike[str], train: bool) -> ImageSplit:
    """Read torchvision's CIFAR-10 batch files under ``root`` into an :class:`ImageSplit`."""
    return load_torchvision(root, train, "cifar10")


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
            _warn_unwritable_cache(Path(cache_dir), err)  # type: ignore[arg-type]
    return split


_UNWRITABLE_CACHES: set[Path] = set()  # cache folders already reported, so each is reported once per process


def _warn_unwritable_cache(folder: Path, err: OSError) -> None:
    """One warning per cache folder that cannot be written (every split and every load would repeat it)."""
    if folder in _UNWRITABLE_CACHES:
        return
    _UNWRITABLE_CACHES.add(folder)
    reason = err.strerror or str(err)
    warnings.warn(
        f"cannot write the decoded-image cache in {folder} ({reason}); images are decoded again on every run: pass "
        "--cache_dir with a folder you can write to",
        stacklevel=3,
    )
