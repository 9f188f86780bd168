"""Crash-safe file writes: a temp file beside the target, fsync, ``os.replace``, fsync of the folder."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import torch


def fsync_dir(folder: Path) -> None:
    """Make a rename inside ``folder`` durable (POSIX; a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_torch_save(obj: object, target: Path) -> None:
    """``torch.save`` so that ``target`` is always either the old file or the complete new one.

    Temp files left by a process killed mid-write are removed by the next write to the same target.
    """
    _atomic_write(target, lambda f: torch.save(obj, f))


def atomic_write_text(text: str, target: Path) -> None:
    """Write ``text`` (UTF-8) so that ``target`` is always either the old file or the complete new one."""
    _atomic_write(target, lambda f: f.write(text.encode()))


def _atomic_write(target: Path, write: Callable[[BinaryIO], object]) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{target.name}."
    for stale in target.parent.glob(f"{prefix}*.tmp"):
        stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=prefix, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; the file is as readable as its folder
        os.replace(tmp, target)
        tmp = None
        fsync_dir(target.parent)
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
