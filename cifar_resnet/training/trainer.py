"""The one place that builds a Lightning Trainer: precision, callbacks, logger, checkpointing."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from cifar_resnet.errors import UserError
from cifar_resnet.training.callbacks import (
    AugmentationPreview,
    EpochThroughput,
    LineProgress,
    SaveRunArguments,
    StepMetricsBar,
)
from cifar_resnet.training.reliability import BackgroundCheckpointIO, DivergenceStop, GracefulInterrupt, RNGState
from cifar_resnet.training.reporting import ValidationReport
from cifar_resnet.training.runs import RunLocation

BEST_CHECKPOINT_PATTERN = "best-epoch{epoch:03d}-val_acc{val/acc:.4f}"


class _DropAdverts(logging.Filter):
    """Lightning prints a product tip at every Trainer start; it is noise in a training log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("\N{ELECTRIC LIGHT BULB} Tip")


logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DropAdverts())
# Lightning 2.6 calls a torch pytree check that newer torch deprecates; the user can do nothing about it.
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
# The training step is one manual optimizer step whose checkpoints are meant to hold the state after it.
warnings.filterwarnings("ignore", message=r"Using ModelCheckpoint with manual optimization and every_n_train_steps")


def uses_cuda(accelerator: str) -> bool:
    """Whether Lightning will place the run on a CUDA GPU for this ``--accelerator`` value."""
    return accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()


def resolve_precision(precision: str, accelerator: str) -> str:
    """``auto``: bf16-mixed on GPUs that have bf16, 16-mixed on older CUDA GPUs, 32-true on the CPU."""
    if precision.startswith("bf16") and uses_cuda(accelerator) and not torch.cuda.is_bf16_supported():
        raise UserError(f"--precision {precision}: this GPU has no bf16; use 16-mixed or 32-true")
    if precision != "auto":
        return precision
    if uses_cuda(accelerator):
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "32-true"


@dataclass
class TrainerSettings:
    """What the Trainer needs from the command line."""

    arch: str
    max_epochs: int
    log_dir: str = "lightning_logs"
    accelerator: str = "auto"
    devices: str = "auto"
    strategy: str = "auto"
    precision: str = "auto"
    deterministic: bool = False
    limit_train_batches: float | None = None
    limit_val_batches: float | None = None
    fast_dev_run: bool = False
    progress: str = "auto"  # auto | bar | lines | none
    log_every_n_steps: int = 50
    confusion_every_n_epochs: int | None = None  # None: within a time budget
    ckpt_every_n_steps: int | None = None
    max_nonfinite_steps: int = 3
    resume_location: RunLocation | None = None
    run_arguments: dict[str, Any] = field(default_factory=dict)


def _progress_callback(kind: str) -> Callback | None:
    if kind == "auto":
        kind = "bar" if sys.stdout.isatty() else "lines"
    if kind == "bar":
        # Reading logged values for the bar synchronises the device; refresh every 20 batches, not each.
        return StepMetricsBar(refresh_rate=20)
    if kind == "lines":
        return LineProgress(every=50)
    return None


def _parse_devices(devices: str) -> int | str | list[int]:
    if devices == "auto":
        return devices
    try:
        parsed: int | list[int] = [int(d) for d in devices.split(",") if d.strip()] if "," in devices else int(devices)
    except ValueError as err:
        raise UserError(f"--devices must be 'auto', a count or a comma list of ids, got {devices!r}") from err
    if isinstance(parsed, int) and parsed < 1 and parsed != -1:
        raise UserError(f"--devices must be a positive count, got {devices}")
    return parsed


def _check_devices(accelerator: str, devices: int | str | list[int]) -> None:
    """CPU "devices" are processes; more than the machine's cores is a mistake, not a speed-up."""
    if accelerator == "cpu" and isinstance(devices, int) and devices > (os.cpu_count() or 1):
        raise UserError(f"--devices {devices} on the CPU, but this machine has {os.cpu_count()} cores")


@dataclass(frozen=True)
class Checkpoints:
    """The checkpoint callbacks of a run: the best on ``val/acc`` and ``last.ckpt`` after every epoch."""

    best: ModelCheckpoint
    last: ModelCheckpoint


def build_trainer(settings: TrainerSettings) -> tuple[L.Trainer, Checkpoints]:
    """A Trainer writing TensorBoard logs and checkpoints to ``log_dir/<arch>/version_N``.

    Resuming from a checkpoint inside such a folder reuses that folder, so curves continue in place.
    """
    location = settings.resume_location
    logger = TensorBoardLogger(
        save_dir=str(location.save_dir) if location else settings.log_dir,
        name=location.name if location else settings.arch,
        version=location.version if location else None,
        default_hp_metric=False,
    )
    checkpoints = Checkpoints(
        best=ModelCheckpoint(
            filename=BEST_CHECKPOINT_PATTERN, monitor="val/acc", mode="max", save_top_k=1, auto_insert_metric_name=False
        ),
        # Since Lightning 2.6, save_last=True writes last.ckpt only when a top-k checkpoint is saved in the
        # same step, so an epoch that does not improve would leave last.ckpt stale. A second, unmonitored
        # callback rewrites last.ckpt after every epoch.
        last=ModelCheckpoint(filename="last", monitor=None, save_top_k=1, enable_version_counter=False),
    )
    callbacks: list[Callback] = [
        checkpoints.best,
        checkpoints.last,
        RNGState(),
        DivergenceStop(settings.max_nonfinite_steps),
        GracefulInterrupt(checkpoints.last),
        EpochThroughput(),
        AugmentationPreview(),
        SaveRunArguments(settings.run_arguments),
        ValidationReport(settings.confusion_every_n_epochs),
    ]
    if settings.ckpt_every_n_steps:
        # Mid-epoch saves rewrite the same last.ckpt (a ModelCheckpoint saves per step or per epoch, not both).
        callbacks.append(
            ModelCheckpoint(
                filename="last", every_n_train_steps=settings.ckpt_every_n_steps, enable_version_counter=False
            )
        )
    progress = _progress_callback(settings.progress)
    if progress is not None:
        callbacks.append(progress)
    plugins: list[Any] = [BackgroundCheckpointIO()]
    if SLURMEnvironment.detect():
        # Lightning saves an hpc checkpoint and requeues the job on SLURM's pre-emption signal.
        plugins.append(SLURMEnvironment(auto_requeue=True))
    devices = _parse_devices(settings.devices)
    _check_devices(settings.accelerator, devices)
    precision = resolve_precision(settings.precision, settings.accelerator)
    if uses_cuda(settings.accelerator):
        torch.backends.cudnn.benchmark = not settings.deterministic
        torch.set_float32_matmul_precision("high")
    optional: dict[str, Any] = {}
    if settings.limit_train_batches is not None:
        optional["limit_train_batches"] = settings.limit_train_batches
    if settings.limit_val_batches is not None:
        optional["limit_val_batches"] = settings.limit_val_batches
    try:
        trainer = L.Trainer(
            accelerator=settings.accelerator,
            devices=devices,
            strategy=settings.strategy,
            precision=precision,
            max_epochs=settings.max_epochs,
            logger=logger,
            callbacks=callbacks,
            deterministic=settings.deterministic,
            fast_dev_run=settings.fast_dev_run,
            enable_progress_bar=progress is not None,
            log_every_n_steps=settings.log_every_n_steps,
            # The DataModule builds its own seeded samplers for every process count.
            use_distributed_sampler=False,
            enable_model_summary=False,
            plugins=plugins,
            **optional,
        )
    except (MisconfigurationException, ValueError, RuntimeError) as err:
        # Lightning refuses impossible placements (16-mixed on the CPU, no GPU, too many devices) with these.
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot run on this machine: {reason}") from err
    return trainer, checkpoints


def run_dir(trainer: L.Trainer) -> Path | None:
    """The folder this trainer's logger writes to."""
    return Path(trainer.logger.log_dir) if trainer.logger is not None and trainer.logger.log_dir else None
