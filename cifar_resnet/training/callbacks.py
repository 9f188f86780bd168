"""Training callbacks that Lightning does not ship: throughput, augmentation preview, plain-text progress."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ProgressBar, TQDMProgressBar
from lightning.pytorch.trainer.states import TrainerFn
from torchvision.utils import make_grid

from cifar_resnet.training.media import MediaLog


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class EpochThroughput(Callback):
    """Logs ``train/images_per_sec`` once per epoch: images trained over wall time of the training batches.

    Lightning's ThroughputMonitor synchronises the device after every batch; one synchronisation per
    epoch is enough for an epoch figure and costs the GPU nothing.
    """

    def __init__(self) -> None:
        self._start = 0.0
        self._images = 0
        self._epoch: int | None = None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        # Started at an epoch's first batch here, rather than at on_train_epoch_start, which Lightning does not
        # call when it resumes in the middle of an epoch: a resumed epoch is timed from its first resumed batch.
        if self._epoch != trainer.current_epoch:
            _sync(pl_module.device)
            self._start, self._images, self._epoch = time.perf_counter(), 0, trainer.current_epoch

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._images += batch[1].shape[0]
        if batch_idx + 1 == trainer.num_training_batches:
            _sync(pl_module.device)
            elapsed = max(time.perf_counter() - self._start, 1e-9)
            rate = self._images * trainer.world_size / elapsed
            pl_module.log("train/images_per_sec", float(rate), on_step=False, on_epoch=True, sync_dist=False)


class AugmentationPreview(Callback):
    """Logs a grid of augmented training images when fitting starts (to each logger that takes images)."""

    def __init__(self, count: int = 64, media: MediaLog | None = None) -> None:
        self.count = count
        self.media = media or MediaLog()

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        datamodule = trainer.datamodule
        if not self.media.wanted(trainer) or not hasattr(datamodule, "augmented_preview"):
            return
        images = datamodule.augmented_preview(self.count)
        grid = make_grid(images, nrow=8, padding=2)
        self.media.image(trainer, "train/augmented_samples", grid, trainer.global_step)


class SaveRunConfig(Callback):
    """Writes the run's resolved options into its folder as ``config.yaml``, which replays the run with
    ``--config``; a resumed run keeps the first file and adds ``config.resume1.yaml``, ... beside it. Every
    checkpoint carries the run's options too (``run_config``), so ``--ckpt_path`` alone continues the run."""

    def __init__(self, render: Callable[[L.Trainer], str], options: dict[str, Any] | None = None) -> None:
        self.render = render
        self.options = options or {}

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if self.options:
            checkpoint["run_config"] = dict(self.options)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero or trainer.logger is None or trainer.logger.log_dir is None:
            return
        run_dir = Path(trainer.logger.log_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        target, resume = run_dir / "config.yaml", 1
        while target.exists():
            target = run_dir / f"config.resume{resume}.yaml"
            resume += 1
        target.write_text(self.render(trainer))


def format_duration(seconds: float) -> str:
    """``3h 05m``, ``12m 40s`` or ``45s``."""
    total = round(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


class LineProgress(ProgressBar):
    """Progress as plain lines, for logs and CI where a redrawn bar turns into noise.

    A line every ``every`` training batches and one per epoch with the time left; reading logged values
    synchronises the device, so it happens only when a line is printed.
    """

    def __init__(self, every: int = 50) -> None:
        super().__init__()
        self.every = max(1, every)
        self._enabled = True
        self._epoch_start: tuple[int, float, int] | None = None  # (epoch, when, first batch timed)
        self._finished_epoch: tuple[int, float | None, int] | None = None
        self._epoch_seconds: list[float] = []

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def _print(self, text: str) -> None:
        if self._enabled:
            print(text, file=sys.stdout, flush=True)

    @staticmethod
    def _format(metrics: dict[str, Any], keys: tuple[str, ...]) -> str:
        shown = []
        for key in keys:
            if key in metrics:
                value = metrics[key]
                shown.append(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}")
        return "  ".join(shown)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._print_finished_epoch(trainer)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        if self._epoch_start is None or self._epoch_start[0] != trainer.current_epoch:
            self._print_finished_epoch(trainer)  # a resumed run reaches a new epoch without on_train_epoch_start
            self._epoch_start = (trainer.current_epoch, time.perf_counter(), idx)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        done = batch_idx + 1
        if done % self.every and done != self.total_train_batches:
            return
        metrics = getattr(pl_module, "step_metrics", {})  # host values of the last logged step: no device read
        epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else "?"
        self._print(
            f"epoch {trainer.current_epoch + 1}/{epochs}  batch {done}/{self.total_train_batches}  "
            + self._format(metrics, ("train/loss_step",))
        )

    @staticmethod
    def _scalars(trainer: L.Trainer) -> dict[str, float]:
        return {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The LightningModule logs the epoch's training metrics in its own on_train_epoch_end, which runs
        # after this hook, so the line is printed once they exist: when the next epoch or the fit ends.
        start = self._epoch_start
        timed = start is not None and start[0] == trainer.current_epoch
        elapsed = time.perf_counter() - start[1] if timed and start is not None else None
        self._finished_epoch = (trainer.current_epoch + 1, elapsed, start[2] if timed and start is not None else -1)

    def _print_finished_epoch(self, trainer: L.Trainer) -> None:
        if self._finished_epoch is None:
            return
        epoch, elapsed, first_batch = self._finished_epoch
        self._finished_epoch = None
        keys = ("train/loss", "train/acc", "val/loss", "val/acc", "val/acc_best", "train/images_per_sec")
        if elapsed is None:  # resumed after its last training batch: this process did not time it
            line = f"epoch {epoch} done (resumed after its training)  "
        elif first_batch > 0:
            line = f"epoch {epoch} done in {elapsed:.1f}s (resumed at batch {first_batch + 1})  "
        else:
            line = f"epoch {epoch} done in {elapsed:.1f}s  "
            self._epoch_seconds.append(elapsed)
        line += self._format(self._scalars(trainer), keys)
        remaining = (trainer.max_epochs or 0) - epoch
        if remaining > 0 and self._epoch_seconds:
            recent = self._epoch_seconds[-5:]  # recent whole epochs: the first one also pays for warm-up
            line += f"  eta {format_duration(remaining * sum(recent) / len(recent))}"
        self._print(line)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._print_finished_epoch(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._print_finished_epoch(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.VALIDATING:  # a stand-alone validation; in fit the epoch line reports it
            self._print("validate  " + self._format(self._scalars(trainer), ("val/loss", "val/acc", "val/acc_top5")))

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._print("test  " + self._format(self._scalars(trainer), ("test/loss", "test/acc", "test/acc_top5")))


class StepMetricsBar(TQDMProgressBar):
    """Lightning's tqdm bar, with epochs counted from 1 (``Epoch 3/200``) and the last logged step loss (a host
    value: showing it costs no device read)."""

    def on_train_epoch_start(self, trainer: L.Trainer, *_: Any) -> None:
        super().on_train_epoch_start(trainer)
        epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else "?"
        self.train_progress_bar.set_description(f"Epoch {trainer.current_epoch + 1}/{epochs}")

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        step = getattr(pl_module, "step_metrics", {})
        if "train/loss_step" in step:
            metrics["loss"] = f"{step['train/loss_step']:.4g}"
        return metrics
