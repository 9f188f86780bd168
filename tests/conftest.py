"""Shared fixtures: CPU only, outputs under tmp_path, generated image folders and torchvision CIFAR-10/100 files, a
real CIFAR-10 subset."""

from __future__ import annotations

import contextlib
import os
import pickle
import random
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_CIFAR = REPO_ROOT.parent / "shared" / "cifar10-jpeg"


@pytest.fixture(scope="session", autouse=True)
def _no_process_left_behind() -> Iterator[None]:
    """Fail the session when a process a test started (a script, its loader workers) outlives the tests.

    Every process started with this session's environment carries its mark, also after its parent died and it was
    re-parented; at the end the session waits for them to exit (a bounded guard), then ends and names those left.
    """
    from tests.helpers import SESSION_MARK, wait_until_gone

    mark = f"{os.getpid()}-{uuid.uuid4().hex}"
    os.environ[SESSION_MARK] = mark
    yield
    left = wait_until_gone(SESSION_MARK, mark, timeout=30)
    for pid, _ in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert not left, f"tests left processes running: {left}"


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test on the CPU, with its own decode cache, and two intra-op threads (the machine's cores)."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setenv("CIFAR_RESNET_CACHE", str(tmp_path / "cache"))
    torch.set_num_threads(min(2, os.cpu_count() or 1))


def class_colour(label: int, classes: int) -> tuple[int, int, int]:
    """A distinct base colour per class, so tiny generated data sets are learnable."""
    hue = label / classes
    return tuple(int(255 * (0.5 + 0.45 * np.sin(2 * np.pi * (hue + k / 3)))) for k in range(3))


def make_image_folder(
    root: Path,
    classes: int = 3,
    per_class: dict[str, int] | None = None,
    size: int = 32,
    ext: str = "png",
    seed: int = 0,
) -> Path:
    """Write ``root/<split>/class_<k>/<i>.<ext>`` with class-coloured noisy images; returns ``root``."""
    per_class = per_class or {"train": 12, "test": 5}
    rng = np.random.default_rng(seed)
    for split, count in per_class.items():
        for label in range(classes):
            folder = root / split / f"class_{label}"
            folder.mkdir(parents=True, exist_ok=True)
            base = np.array(class_colour(label, classes), dtype=np.float64)
            for i in range(count):
                noise = rng.normal(0, 40, size=(size, size, 3))
                pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i:04d}.{ext}")
    return root


def write_cifar10_batches(root: Path, train_per_batch: int = 6, test_count: int = 7, seed: int = 0) -> Path:
    """Write the five training batches, the test batch and the meta file in CIFAR-10's pickled format."""
    from cifar_resnet.data.sources import CIFAR10_CLASSES

    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    rng = np.random.default_rng(seed)

    def dump(name: str, count: int) -> None:
        entry = {
            "data": rng.integers(0, 256, size=(count, 3 * 32 * 32), dtype=np.uint8),
            "labels": [int(v) for v in rng.integers(0, 10, size=count)],
        }
        with open(base / name, "wb") as f:
            pickle.dump(entry, f)

    for k in range(1, 6):
        dump(f"data_batch_{k}", train_per_batch)
    dump("test_batch", test_count)
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({"label_names": list(CIFAR10_CLASSES)}, f)
    return root


CIFAR100_TEST_NAMES = tuple(f"fine_{k:02d}" for k in range(100))  # not the real names: read back from the files


def write_cifar100_files(root: Path, train_per_class: int = 2, test_per_class: int = 1, seed: int = 0) -> Path:
    """Write ``cifar-100-python/{train,test,meta}`` in CIFAR-100's pickled format (as torchvision reads it): rows of
    3072 CHW bytes, ``fine_labels`` / ``coarse_labels``, and ``fine_label_names`` in the meta file. Each class gets
    its own colour, so the images are learnable; every class appears in both splits."""
    base = root / "cifar-100-python"
    base.mkdir(parents=True)
    rng = np.random.default_rng(seed)

    def dump(name: str, per_class: int) -> None:
        labels = rng.permutation(np.repeat(np.arange(100), per_class))
        colours = np.array([class_colour(int(k), 100) for k in labels], dtype=np.float64)
        pixels = colours[:, :, None] + rng.normal(0, 30, size=(len(labels), 3, 32 * 32))
        entry = {
            "filenames": [f"{name}_{i}.png" for i in range(len(labels))],
            "data": np.clip(pixels, 0, 255).astype(np.uint8).reshape(len(labels), 3 * 32 * 32),
            "fine_labels": [int(v) for v in labels],
            "coarse_labels": [int(v) // 5 for v in labels],
        }
        with open(base / name, "wb") as f:
            pickle.dump(entry, f)

    dump("train", train_per_class)
    dump("test", test_per_class)
    with open(base / "meta", "wb") as f:
        pickle.dump({"fine_label_names": list(CIFAR100_TEST_NAMES),
                     "coarse_label_names": [f"coarse_{k:02d}" for k in range(20)]}, f)  # fmt: skip
    return root


@pytest.fixture
def tiny_folder(tmp_path: Path) -> Path:
    """3 classes, 12 training and 5 test images each, 32x32 PNG."""
    return make_image_folder(tmp_path / "tiny")


def real_cifar_subset(root: Path, per_class: int, seed: int) -> Path:
    """Symlink a seeded subset of the shared CIFAR-10 JPEGs into ``root/train/<class>/``.

    Fails (never skips) under CI when the shared data is missing.
    """
    if not SHARED_CIFAR.is_dir():
        message = f"real-data test needs {SHARED_CIFAR}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    rng = random.Random(seed)
    for class_dir in sorted(p for p in (SHARED_CIFAR / "train").iterdir() if p.is_dir()):
        files = sorted(class_dir.iterdir())
        target = root / "train" / class_dir.name
        target.mkdir(parents=True, exist_ok=True)
        for src in rng.sample(files, per_class):
            (target / src.name).symlink_to(src)
    return root
