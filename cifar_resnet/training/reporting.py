"""What the model learned, logged during fit: confusion matrix, per-class accuracy, final hparams."""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger

from cifar_resnet.tools.plots import confusion_figure
from cifar_resnet.training.media import MediaLog


def _tensorboard(trainer: L.Trainer) -> TensorBoardLogger | None:
    return next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)


class ValidationReport(Callback):
    """Per validation: ``val/acc_class/<name>`` scalars and the confusion matrix as an image
    (``val/confusion_matrix``). At the end the hparams tab gets ``hp/best_val_acc`` and, after a test,
    ``hp/test_acc``.

    The module computes the validation confusion matrix once per validation (one sync) and leaves it in
    ``val_confusion_matrix``. Drawing the figure takes a few hundred milliseconds, as long as a whole GPU epoch of a
    small ResNet, so by default (``figure_every_n_epochs=None``) it is drawn only when the time since the
    last drawing is at least ``1 / figure_budget`` times what that drawing took: at most 2% of the run.
    On a CPU, where an epoch takes minutes, that is every epoch. It is always drawn after the last epoch.
    """

    def __init__(
        self, figure_every_n_epochs: int | None = None, figure_budget: float = 0.02, media: MediaLog | None = None
    ) -> None:
        self.media = media or MediaLog()
        self.figure_every_n_epochs = figure_every_n_epochs
        self.figure_budget = figure_budget
        self._last_drawn: tuple[float, float] | None = None  # (when it finished, seconds it took)
        self._best_val_acc: float | None = None

    def _figure_due(self, epoch: int, last_epoch: bool) -> bool:
        if last_epoch:
            return True
        if self.figure_every_n_epochs is not None:
            return (epoch + 1) % self.figure_every_n_epochs == 0
        if self._last_drawn is None:
            return True
        finished, took = self._last_drawn
        return time.perf_counter() - finished >= took / self.figure_budget

    @staticmethod
    def _classes(trainer: L.Trainer, num_classes: int) -> list[str]:
        datamodule = trainer.datamodule
        try:
            classes = list(datamodule.classes) if datamodule is not None else []
        except (AssertionError, AttributeError):  # not set up, or a DataModule without class names
            classes = []
        return classes if len(classes) == num_classes else [f"class_{k}" for k in range(num_classes)]

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """After the module has computed (and reset) the epoch's confusion matrix: scalars and the figure."""
        matrix = getattr(pl_module, "val_confusion_matrix", None)
        if matrix is None or trainer.sanity_checking or not trainer.is_global_zero or trainer.logger is None:
            return
        pl_module.val_confusion_matrix = None
        classes = self._classes(trainer, matrix.shape[0])
        totals = matrix.sum(dim=1)
        per_class = {f"val/acc_class/{name}": float(matrix[k, k] / totals[k])
                     for k, name in enumerate(classes) if totals[k] > 0}  # fmt: skip
        trainer.logger.log_metrics(per_class, step=trainer.global_step)
        epoch = trainer.current_epoch
        last_epoch = trainer.max_epochs is not None and epoch + 1 >= trainer.max_epochs
        if self.media.wanted(trainer) and self._figure_due(epoch, last_epoch):
            start = time.perf_counter()
            figure = confusion_figure(matrix, classes, f"Validation confusion matrix, epoch {epoch + 1}")
            self.media.figure(trainer, "val/confusion_matrix", figure, trainer.global_step)
            self._last_drawn = (time.perf_counter(), time.perf_counter() - start)

    def _log_hparams(self, trainer: L.Trainer, pl_module: L.LightningModule, metrics: dict[str, float]) -> None:
        if not trainer.is_global_zero or not metrics:
            return
        tensorboard = _tensorboard(trainer)
        for logger in trainer.loggers:  # the others logged the hyperparameters when fitting started
            if logger is not tensorboard:
                logger.log_metrics(metrics, step=trainer.global_step)
        if tensorboard is None:
            return
        params: dict[str, Any] = dict(pl_module.hparams)
        if trainer.datamodule is not None and hasattr(trainer.datamodule, "hparams"):
            params.update({f"data/{k}": v for k, v in trainer.datamodule.hparams.items()})
        tensorboard.log_hyperparams(params, metrics)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        best = trainer.checkpoint_callback.best_model_score if trainer.checkpoint_callback else None
        if best is None and "val/acc_best" in trainer.callback_metrics:
            best = trainer.callback_metrics["val/acc_best"]
        self._best_val_acc = float(best) if isinstance(best, torch.Tensor | float) else None
        if self._best_val_acc is not None:
            self._log_hparams(trainer, pl_module, {"hp/best_val_acc": self._best_val_acc})

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        test_acc = trainer.callback_metrics.get("test/acc")
        if test_acc is None or self._best_val_acc is None:
            return
        # A second hparams record for the same run supersedes the first one in TensorBoard's hparams tab.
        self._log_hparams(trainer, pl_module, {"hp/best_val_acc": self._best_val_acc, "hp/test_acc": float(test_acc)})
