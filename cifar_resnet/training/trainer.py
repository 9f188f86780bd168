"""The one place that builds a Lightning Trainer: precision, callbacks, logger, checkpointing."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from cifar_resnet.config import TrainerConfig
from cifar_resnet.errors import UserError
from cifar_resnet.training.callbacks import (
    AugmentationPreview,
    EpochThroughput,
    LineProgress,
    SaveRunConfig,
    StepMetricsBar,
)
from cifar_resnet.training.loggers import build_logger
from cifar_resnet.training.records import RunClock
from cifar_resnet.training.reliability import (
    BackgroundCheckpointIO,
    CheckpointWriteWatch,
    DivergenceStop,
    GracefulInterrupt,
    RNGState,
    RunFolderRelocation,
    StepCheckpoint,
    StopSignals,
    ValidationRerun,
)
from cifar_resnet.training.reporting import ValidationReport
from cifar_resnet.training.runs import RunLocation

BEST_CHECKPOINT_PATTERN = "best-epoch{epoch:03d}-val_acc{val/acc:.4f}"


def uses_cuda(accelerator: str) -> bool:
    """Whether Lightning will place the run on a CUDA GPU for this ``--accelerator`` value."""
    return accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()


def resolve_precision(precision: str, accelerator: str) -> str:
    """``auto``: bf16-mixed on GPUs that have bf16, 16-mixed on older CUDA GPUs, 32-true on the CPU."""
    if precision.startswith("bf16") and uses_cuda(accelerator) and not torch.cuda.is_bf16_supported():
        raise UserError(f"--precision {precision}: this GPU has no bf16; use 16-mixed or 32-true")
    if precision == "16-mixed" and not uses_cuda(accelerator):
        # Lightning would quietly switch to bf16-mixed: say so instead of training in another precision.
        raise UserError("--precision 16-mixed needs a CUDA GPU; on the CPU use bf16-mixed or 32-true")
    if precision != "auto":
        return precision
    if uses_cuda(accelerator):
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "32-true"


def _progress_callback(kind: str) -> Callback | None:
    if kind == "auto":
        kind = "bar" if sys.stdout.isatty() else "lines"
    if kind == "bar":
        # Reading logged values for the bar synchronises the device; refresh every 20 batches, not each.
        return StepMetricsBar(refresh_rate=20)
    if kind == "lines":
        return LineProgress(every=50)
    return None


def _check_devices(accelerator: str, devices: Any) -> None:
    """CPU "devices" are processes: a count, and more than the machine's cores is a mistake, not a speed-up."""
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    if on_cpu and isinstance(devices, list):
        ids = ",".join(map(str, devices))
        raise UserError(f"--devices {ids} names GPUs, but this run is on the CPU; give a number of processes "
                        f"(e.g. --devices {len(devices)})")  # fmt: skip
    if accelerator == "cpu" and isinstance(devices, int) and devices > (os.cpu_count() or 1):
        raise UserError(f"--devices {devices} on the CPU, but this machine has {os.cpu_count()} cores")


class EpochNamedCheckpoint(ModelCheckpoint):
    """ModelCheckpoint whose file names count epochs from 1, as every line the scripts print does."""

    def format_checkpoint_name(
        self, metrics: dict[str, Any], filename: str | None = None, ver: int | None = None, prefix: str | None = None
    ) -> str:
        if "epoch" in metrics:
            metrics = {**metrics, "epoch": metrics["epoch"] + 1}
        return super().format_checkpoint_name(metrics, filename, ver, prefix)

    @property
    def state_key(self) -> str:
        # Saved under ModelCheckpoint's key, so checkpoints from before this class keep their best record.
        return super().state_key.replace(type(self).__qualname__, ModelCheckpoint.__qualname__, 1)


def launcher_world() -> tuple[int, int, str] | None:
    """Processes per node, nodes, and the launcher's name, when torchrun or SLURM started this process."""
    env = os.environ
    if "WORLD_SIZE" in env and "LOCAL_WORLD_SIZE" in env and "TORCHELASTIC_RUN_ID" in env:
        per_node = int(env["LOCAL_WORLD_SIZE"])
        return per_node, max(1, int(env["WORLD_SIZE"]) // max(per_node, 1)), "torchrun"
    if "SLURM_NTASKS" in env and "SLURM_NNODES" in env and env.get("SLURM_JOB_NAME") not in ("bash", "interactive"):
        nodes = int(env["SLURM_NNODES"])
        return max(1, int(env["SLURM_NTASKS"]) // nodes), nodes, "srun"
    return None


def check_launcher_world(devices: Any, num_nodes: int) -> None:
    """Under torchrun or srun the launcher fixes the process count: the flags must describe the same count."""
    world = launcher_world()
    if world is None:
        if num_nodes > 1 and not ("MASTER_ADDR" in os.environ and "NODE_RANK" in os.environ):
            # Lightning would wait (for 30 minutes, past SIGTERM) for nodes that nothing starts.
            raise UserError(
                f"--num_nodes {num_nodes} needs the other machines' processes: start the command on every machine "
                "with torchrun (--nnodes, --node_rank) or srun, or set MASTER_ADDR, MASTER_PORT and NODE_RANK on each"
            )
        return
    per_node, nodes, launcher = world
    given = len(devices) if isinstance(devices, list) else devices
    if (given not in ("auto", per_node) and given != -1) or num_nodes != nodes:
        raise UserError(
            f"{launcher} started {per_node * nodes} processes ({nodes} node{'s' if nodes > 1 else ''} x {per_node}), "
            f"but --devices {given} --num_nodes {num_nodes} describe another count; pass --devices {per_node} "
            f"--num_nodes {nodes} (--devices counts processes per node)"
        )


@dataclass(frozen=True)
class Checkpoints:
    """The checkpoint callbacks of a run: the best on ``val/acc`` and ``last.ckpt`` after every epoch."""

    best: ModelCheckpoint
    last: ModelCheckpoint


@dataclass(frozen=True)
class RunLabel:
    """Where a run's files go and what its ``config.yaml`` records besides the options."""

    name: str  # the folder under --log_dir, the architecture
    location: RunLocation | None = None  # the run folder, claimed or resumed; None: the logger picks one
    run_config: Callable[[L.Trainer], str] | None = None  # the config.yaml text, once the trainer is built
    options: dict[str, Any] | None = None  # the run's options, stored in every checkpoint
    signals: StopSignals | None = None  # SIGINT/SIGTERM as the script watches them


def build_trainer(config: TrainerConfig, label: RunLabel) -> tuple[L.Trainer, Checkpoints]:
    """A Trainer writing ``--logger``'s logs and the checkpoints to ``log_dir/<arch>/version_N``.

    Resuming from a checkpoint inside such a folder reuses that folder, so curves continue in place.
    """
    location = label.location
    logger = build_logger(config, location, label.name)
    # Checkpoints go to the run folder whatever the logger: Lightning would put them under an MLflow store or
    # a W&B project name (its save_dir/name/version), where neither the tools nor a resume look.
    ckpt_dir = str(location.path / "checkpoints") if location is not None else None
    checkpoints = Checkpoints(
        best=EpochNamedCheckpoint(
            dirpath=ckpt_dir,
            filename=BEST_CHECKPOINT_PATTERN,
            monitor="val/acc",
            mode="max",
            save_top_k=0 if config.limit_val_batches == 0 else 1,  # no validation: nothing to select on
            auto_insert_metric_name=False,
        ),
        # Since Lightning 2.6, save_last=True writes last.ckpt only when a top-k checkpoint is saved in the
        # same step, so an epoch that does not improve would leave last.ckpt stale. A second, unmonitored
        # callback rewrites last.ckpt after every epoch.
        last=ModelCheckpoint(
            dirpath=ckpt_dir, filename="last", monitor=None, save_top_k=1, enable_version_counter=False
        ),
    )
    callbacks: list[Callback] = [
        checkpoints.best,
        checkpoints.last,
        RNGState(),
        DivergenceStop(config.max_nonfinite_steps),
        GracefulInterrupt(checkpoints.last, label.signals),
        ValidationRerun(),
        CheckpointWriteWatch(),
        EpochThroughput(),
        AugmentationPreview(),
        ValidationReport(config.confusion_every_n_epochs),
        RunClock(),
    ]
    if label.run_config is not None:
        callbacks.append(SaveRunConfig(label.run_config, label.options))
    callbacks.append(RunFolderRelocation())
    if config.ckpt_every_n_steps:
        # Mid-epoch saves rewrite the same last.ckpt (a ModelCheckpoint saves per step or per epoch, not both).
        callbacks.append(
            StepCheckpoint(
                dirpath=ckpt_dir,
                filename="last",
                every_n_train_steps=config.ckpt_every_n_steps,
                enable_version_counter=False,
            )
        )
    progress = _progress_callback(config.progress)
    if progress is not None:
        callbacks.append(progress)
    plugins: list[Any] = [BackgroundCheckpointIO(label.signals)]
    if SLURMEnvironment.detect():
        # SLURM's SIGTERM (time limit, pre-emption) stops the run through GracefulInterrupt, which writes last.ckpt;
        # a requeued job continues it with --ckpt_path auto. Lightning's own requeue would write a separate
        # hpc checkpoint into the working directory instead.
        plugins.append(SLURMEnvironment(auto_requeue=False))
    _check_devices(config.accelerator, config.devices)
    check_launcher_world(config.devices, config.num_nodes)
    if config.sync_batchnorm and not uses_cuda(config.accelerator):
        raise UserError("--sync_batchnorm needs CUDA GPUs: torch's DistributedDataParallel refuses SyncBatchNorm on "
                        "the CPU; leave it off here")  # fmt: skip
    precision = resolve_precision(config.precision, config.accelerator)
    if uses_cuda(config.accelerator):
        torch.set_float32_matmul_precision("high")
    optional: dict[str, Any] = {}
    if config.limit_train_batches is not None:
        optional["limit_train_batches"] = config.limit_train_batches
    if config.limit_val_batches is not None:
        optional["limit_val_batches"] = config.limit_val_batches
    try:
        trainer = L.Trainer(
            accelerator=config.accelerator,
            devices=config.devices,
            num_nodes=config.num_nodes,
            strategy=config.strategy,
            sync_batchnorm=config.sync_batchnorm,
            precision=precision,
            max_epochs=config.max_epochs,
            logger=logger,
            callbacks=callbacks,
            deterministic=config.deterministic,
            # cudnn.benchmark times algorithms anew in each process and may pick others after a resume: on only
            # where results need not be bitwise reproducible.
            benchmark=uses_cuda(config.accelerator) and not config.deterministic,
            fast_dev_run=config.fast_dev_run,
            enable_progress_bar=progress is not None,
            log_every_n_steps=config.log_every_n_steps,
            # The DataModule builds its own seeded samplers for every process count.
            use_distributed_sampler=False,
            enable_model_summary=False,
            plugins=plugins,
            **optional,
        )
    except (MisconfigurationException, ValueError, RuntimeError, TypeError) as err:
        # Lightning refuses impossible placements (16-mixed on the CPU, no GPU, too many devices) with these.
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot run on this machine: {reason}") from err
    return trainer, checkpoints


def run_dir(trainer: L.Trainer) -> Path | None:
    """The folder this trainer's logger writes to."""
    return Path(trainer.logger.log_dir) if trainer.logger is not None and trainer.logger.log_dir else None
