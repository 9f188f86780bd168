"""Run folders and checkpoints on disk: ``LOG_DIR/<arch>/version_N/{checkpoints/,args.json,events…}``."""

from __future__ import annotations

import re
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


def find_last_checkpoint(log_dir: str | Path, arch: str) -> Path:
    """The most recently written ``last.ckpt`` of any version of ``arch``; a UserError when there is none."""
    arch_dir = Path(log_dir) / arch
    candidates = [p for p in arch_dir.glob("version_*/checkpoints/last.ckpt") if p.is_file()]
    if not candidates:
        raise UserError(
            f"--ckpt_path last: no last.ckpt under {arch_dir}/version_*/checkpoints/; "
            "start a new run without --ckpt_path, or pass the checkpoint's path"
        )
    return max(candidates, key=lambda p: p.stat().st_mtime_ns)


def run_location_of(checkpoint: Path) -> RunLocation | None:
    """The run folder a checkpoint lives in, when it sits at ``…/<name>/version_N/checkpoints/x.ckpt``."""
    ckpt_dir = checkpoint.resolve().parent
    version_dir = ckpt_dir.parent
    if ckpt_dir.name != "checkpoints" or not _VERSION.match(version_dir.name):
        return None
    return RunLocation(version_dir.parent.parent, version_dir.parent.name, version_dir.name)


def read_checkpoint(path: Path) -> dict[str, Any]:
    """Load a Lightning checkpoint safely (``weights_only=True``; memory-mapped, so big files cost little)."""
    if not path.is_file():
        raise UserError(f"--ckpt_path {path}: no such file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # truncated zip, foreign pickle, refused globals: all mean "not usable"
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"--ckpt_path {path} is not a loadable checkpoint ({reason[:200]})") from err
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise UserError(f"--ckpt_path {path} is not a Lightning checkpoint (no state_dict)")
    return checkpoint


def checkpoint_hparams(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The LightningModule's hyperparameters stored in a checkpoint."""
    return dict(checkpoint.get("hyper_parameters", {}))


def completed_epochs(checkpoint: dict[str, Any]) -> int:
    """Epochs whose training a checkpoint has finished (a mid-epoch checkpoint counts its epoch as not done)."""
    progress = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_progress", {}).get("current", {})
    return int(progress.get("processed", checkpoint.get("epoch", 0)))
