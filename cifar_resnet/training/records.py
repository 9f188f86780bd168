"""The result record of a run: ``result.json`` in its folder, what ``scripts/results.py`` turns into tables.

A record holds what a results table needs and what makes a row reproducible: the model and recipe, the seed,
the best validation accuracy and its epoch, the test accuracy when there is a test split, the training wall
time summed over every resume, the device, how the training step ran (one CUDA graph per step, or eager and
why), the library versions and the exact command.
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

from cifar_resnet import environment
from cifar_resnet.fileio import atomic_write_text

RECORD_NAME = "result.json"
RECORD_VERSION = 1


class RunClock(Callback):
    """Wall time of a run's fits, kept in its checkpoints so that a resumed run adds to it.

    Counted from the start of fitting (data set up, model placed) to the end of fitting: the time a user waits
    for a trained model, validation and checkpoint writes included, the final test not. A checkpoint holds the
    time up to its own writing, so an interrupted fit counts up to its last checkpoint.
    """

    def __init__(self) -> None:
        self.previous = 0.0  # seconds of earlier fits of this run, restored from the checkpoint
        self._started: float | None = None
        self._ended: float | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._started, self._ended = time.monotonic(), None

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._ended = time.monotonic()

    def seconds(self) -> float:
        """The run's wall time so far."""
        if self._started is None:
            return self.previous
        return self.previous + ((self._ended or time.monotonic()) - self._started)

    def state_dict(self) -> dict[str, Any]:
        return {"seconds": self.seconds()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.previous = float(state_dict.get("seconds", 0.0))


def build_record(
    options: dict[str, Any],
    result: dict[str, Any],
    wall_seconds: float,
    device: str,
    command: list[str],
    data: dict[str, Any],
) -> dict[str, Any]:
    """The record of a finished run; ``options`` are its resolved flat options (as in ``config.yaml``)."""
    return {
        "record_version": RECORD_VERSION,
        "arch": options.get("arch"),
        "seed": options.get("seed"),
        "epochs": options.get("max_epochs"),
        "best_val_acc": result.get("best_val_acc"),
        "best_epoch": result.get("best_epoch"),
        "test_acc": result.get("test_acc"),
        "test_selected_on_test": bool(result.get("test_selected_on_test", False)),
        "wall_time_s": round(wall_seconds, 1),
        "device": device,
        # How the training step ran: {"mode": "graphed"} or {"mode": "eager", "reason": why}.
        "step": result.get("step"),
        "versions": environment.library_versions(),
        "git_commit": environment.git_commit(),
        "finished": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "command": " ".join(command),
        "data": data,
        "options": options,
    }


def write_record(run_folder: Path, record: dict[str, Any]) -> Path:
    """``run_folder/result.json``, written atomically (a resumed run that finishes again replaces it)."""
    target = run_folder / RECORD_NAME
    atomic_write_text(json.dumps(record, indent=2, sort_keys=False, default=str) + "\n", target)
    return target
