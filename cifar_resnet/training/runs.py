"""Run folders and checkpoints on disk: ``LOG_DIR/<arch>/version_N/{checkpoints/,config.yaml,events…}``.

A new run claims its folder atomically (``mkdir`` of the next free ``version_N``) and every run, new or
resumed, holds a lock file in its folder while it trains, so two processes never share a folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import socket
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cifar_resnet.errors import UserError

_VERSION = re.compile(r"version_(\d+)$")


@dataclass(frozen=True)
class RunLocation:
    """Where a run's logger writes: ``save_dir/name/version``."""

    save_dir: Path
    name: str
    version: str

    @property
    def path(self) -> Path:
        return self.save_dir / self.name / self.version


LOCK_NAME = ".lock"


def newest_last_checkpoint(log_dir: str | Path, arch: str | None = None) -> Path | None:
    """The most recently written ``last.ckpt`` under ``log_dir`` (of ``arch`` when given), or None."""
    pattern = f"{arch or '*'}/version_*/checkpoints/last.ckpt"
    candidates = [p for p in Path(log_dir).glob(pattern) if p.is_file()]
    return max(candidates, key=lambda p: p.stat().st_mtime_ns) if candidates else None


def find_last_checkpoint(log_dir: str | Path, arch: str | None = None) -> Path:
    """As :func:`newest_last_checkpoint`, but a UserError when there is none."""
    found = newest_last_checkpoint(log_dir, arch)
    if found is None:
        where = Path(log_dir) / (arch or "*")
        raise UserError(
            f"--ckpt_path last: no last.ckpt under {where}/version_*/checkpoints/; "
            "start a new run without --ckpt_path, or pass the checkpoint's path"
        )
    return found


def claim_run_folder(log_dir: str | Path, name: str) -> RunLocation:
    """Create ``log_dir/name/version_N`` for the next free N; ``mkdir`` makes the claim atomic between processes.

    A folder that cannot be created or read (no permission, a read-only file system, a file in the way) is a
    UserError naming it.
    """
    root = Path(log_dir) / name
    try:
        root.mkdir(parents=True, exist_ok=True)
        taken = [int(m.group(1)) for p in root.iterdir() if (m := _VERSION.match(p.name))]
        version = max(taken, default=-1) + 1
        while True:
            try:
                (root / f"version_{version}").mkdir()
                return RunLocation(Path(log_dir), name, f"version_{version}")
            except FileExistsError:
                version += 1
    except OSError as err:
        where = err.filename or root
        reason = err.strerror or type(err).__name__
        raise UserError(
            f"--log_dir {log_dir}: cannot create the run folder ({reason}: {where}); pass a --log_dir you can write to"
        ) from None


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


@contextlib.contextmanager
def run_lock(folder: Path) -> Iterator[str | None]:
    """Hold ``folder/.lock`` while the block runs; yields a note when a stale lock was taken over.

    The lock names this process and host. A lock of a process that no longer runs on this host is stale
    and is replaced; a live one, or one from another host, is a UserError naming its holder.
    """
    lock = folder / LOCK_NAME
    mine = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    note = None
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read_lock(lock)
            if holder is None:
                continue  # removed meanwhile
            if holder.get("host") == mine["host"] and not _process_alive(int(holder.get("pid", -1))):
                lock.unlink(missing_ok=True)
                note = f"took over a stale lock of process {holder.get('pid')} (no longer running) in {folder}"
                continue
            raise UserError(
                f"run folder {folder} is in use by process {holder.get('pid')} on {holder.get('host')} (since "
                f"{holder.get('started')}); wait for it to end, or delete {lock} if that process is gone"
            ) from None
        with os.fdopen(fd, "w") as f:
            json.dump(mine, f)
        break
    try:
        yield note
    finally:
        if (_read_lock(lock) or {}).get("pid") == mine["pid"]:
            lock.unlink(missing_ok=True)


def _read_lock(lock: Path) -> dict[str, Any] | None:
    """The lock's holder; None when there is no lock. A lock being written is read again for up to a second."""
    for _ in range(20):
        try:
            holder = json.loads(lock.read_text() or "{}")
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            holder = {}
        if holder:
            return holder
        time.sleep(0.05)
    return {}


def run_location_of(checkpoint: Path) -> RunLocation | None:
    """The run folder a checkpoint lives in, when it sits in the folder's ``checkpoints/`` (``…/<run>/checkpoints/
    x.ckpt``); a run folder moved or renamed elsewhere still counts."""
    ckpt_dir = checkpoint.resolve().parent
    if ckpt_dir.name != "checkpoints":
        return None
    run = ckpt_dir.parent
    return RunLocation(run.parent.parent, run.parent.name, run.name)


def read_checkpoint(path: Path) -> dict[str, Any]:
    """Load a Lightning checkpoint safely (``weights_only=True``; memory-mapped, so big files cost little)."""
    if not path.is_file():
        raise UserError(f"--ckpt_path {path}: no such file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # truncated zip, foreign pickle, refused globals: all mean "not usable"
        raise UserError(f"--ckpt_path {path} is not a loadable checkpoint ({unloadable_reason(path, err)})") from err
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise UserError(f"--ckpt_path {path} is not a Lightning checkpoint (no state_dict)")
    return checkpoint


def unloadable_reason(path: Path, err: BaseException) -> str:
    """Why ``torch.load(path, weights_only=True)`` failed, in words for the user. torch's own message for a
    refused pickle advises ``weights_only=False``, which would run whatever code the file carries."""
    if path.suffix.lower() == ".onnx":
        return (
            "an ONNX model, which onnxruntime runs; give a checkpoint of fit.py or a .pt/.pth/.safetensors file "
            "of export.py"
        )
    if not zipfile.is_zipfile(path):
        return "not a zip archive as torch.save writes: another kind of file, or a truncated one"
    if isinstance(err, pickle.UnpicklingError):
        return (
            "it holds Python objects other than tensors and plain values, which are not loaded since loading them "
            "can run code"
        )
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return reason[:200]


def checkpoint_hparams(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The LightningModule's hyperparameters stored in a checkpoint."""
    return dict(checkpoint.get("hyper_parameters", {}))
