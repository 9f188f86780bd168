"""Weight averaging (EMA and SWA) through Lightning's ``WeightAveraging`` callbacks.

Lightning's callback keeps a ``torch.optim.swa_utils.AveragedModel`` of the whole LightningModule, updates
it after every optimizer step (EMA) or epoch (SWA), swaps the averaged weights in for validation, and
writes them as the checkpoint's ``state_dict`` (the raw weights go under ``current_model_state``), so the
best checkpoint, the test and the exports read the averaged weights, and a resume restores both. It works
with manual optimization: it only looks at ``trainer.global_step``, which our step counts. Buffers are
averaged too (``use_buffers=True``, Lightning's default), which stands in for SWA's final BN re-estimation.

Two adjustments, both in :class:`_Averaging`:

* Before the first update (SWA before its first epoch) the average is only the initial copy: validation,
  checkpoints and the end of training then keep the raw weights instead of swapping in the copy.
* ``trainer.test(ckpt_path=best)`` after a fit would reload ``current_model_state`` (the raw weights) on
  top of the averaged ``state_dict``; outside fitting the averaged ``state_dict`` is kept.

Cost: ``AveragedModel.update_parameters`` reads its update count back from the device (two host syncs per
update), outside the training step itself, so a CUDA-graph step is unaffected but waits at each update.
"""

from __future__ import annotations

import warnings
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import EMAWeightAveraging, WeightAveraging
from lightning.pytorch.trainer.states import TrainerFn
from torch.optim.swa_utils import get_swa_avg_fn


class _Averaging(WeightAveraging):
    """WeightAveraging that leaves the raw weights in place until the average holds an update."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        with warnings.catch_warnings():
            # Lightning warns that configure_model may shard layers; ours only sets the memory format (and
            # compiles, once), so calling it before copying the model is harmless.
            warnings.filterwarnings("ignore", message=".*overrides the configure_model.*")
            super().setup(trainer, pl_module, stage)

    def _started(self) -> bool:
        return self._average_model is not None and int(self._average_model.n_averaged) > 0

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._swapped = self._started()
        if self._swapped:
            self._swap_models(pl_module)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if getattr(self, "_swapped", False):
            self._swap_models(pl_module)
        self._swapped = False

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._started():
            self._copy_average_to_current(pl_module)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if self._average_model is None or self._started():
            super().on_save_checkpoint(trainer, pl_module, checkpoint)

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            super().on_load_checkpoint(trainer, pl_module, checkpoint)


class EMA(_Averaging, EMAWeightAveraging):
    """An exponential moving average of the weights (torch's ``get_ema_avg_fn``), updated after every step."""

    def __init__(self, decay: float) -> None:
        super().__init__(decay=decay)


class SWA(_Averaging):
    """Stochastic weight averaging (Izmailov et al. 2018): the equal average of the weights after the last step of
    each of the run's last ``epochs`` epochs, trained at a constant LR (the schedule's part, see ``LRSchedule``).

    Lightning's ``StochasticWeightAveraging`` callback is not used: it replaces the LR schedulers it finds in
    the trainer with ``SWALR``, and this module has none (its LR is a closed form written into a tensor).
    """

    def __init__(self, epochs: int) -> None:
        # The per-tensor SWA function: the default multi-tensor one cannot average integer buffers on CUDA.
        super().__init__(avg_fn=get_swa_avg_fn())
        self.epochs = epochs
        self._trainer: L.Trainer | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer = trainer
        super().setup(trainer, pl_module, stage)

    def first_epoch(self) -> int:
        """The first epoch whose end is averaged."""
        assert self._trainer is not None
        return max(0, (self._trainer.max_epochs or 1) - self.epochs)

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        # At the epoch's last optimizer step rather than at the epoch's end: Lightning validates an epoch before
        # its on_train_epoch_end, so an epoch-end update would reach validation one epoch late (the last
        # average would never be validated, checkpointed as best or tested).
        trainer = self._trainer
        if step_idx is None or trainer is None or not trainer.is_last_batch:
            return False
        return trainer.current_epoch >= self.first_epoch()


def averaging_callback(ema: float, swa_epochs: int) -> WeightAveraging | None:
    """The averaging of a run's options, or None; EMA and SWA exclude each other (checked by the caller)."""
    if ema > 0:
        return EMA(ema)
    if swa_epochs > 0:
        return SWA(swa_epochs)
    return None
