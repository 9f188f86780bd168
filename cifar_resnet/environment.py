"""What a run ran on: library versions, the code's git commit and the device, for configs and result records."""

from __future__ import annotations

import platform
import subprocess
from importlib import metadata
from pathlib import Path

import torch

_LIBRARIES = ("cifar_resnet", "torch", "torchvision", "lightning", "torchmetrics")


def library_versions() -> dict[str, str]:
    """Installed versions of the project and the libraries it trains with, and Python's."""
    versions = {}
    for name in _LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    versions["python"] = platform.python_version()
    return versions


def git_commit(folder: Path | None = None) -> str | None:
    """The commit of the git checkout holding this package (``-dirty`` with uncommitted changes), or None."""
    folder = folder or Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, timeout=10)
        if commit.returncode != 0:
            return None
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=folder,
                                capture_output=True, text=True, timeout=10)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return commit.stdout.strip() + ("-dirty" if status.stdout.strip() else "")


def device_name(device: torch.device | str) -> str:
    """``NVIDIA H100 80GB HBM3`` for a GPU, the processor's model name for the CPU."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    except OSError:
        pass
    return platform.processor() or platform.machine() or device.type


def describe(device: torch.device | str) -> dict[str, str]:
    """Versions, commit and device as one flat mapping of short strings."""
    info = {f"{name} version": version for name, version in library_versions().items()}
    info["git commit"] = git_commit() or "not a git checkout"
    info["device"] = device_name(device)
    return info
