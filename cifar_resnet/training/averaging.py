"""Weight averaging (EMA and SWA) of the network's weights, updated inside the training step with no host read.

What users see is what Lightning's ``WeightAveraging`` callbacks give: validation runs on the averaged weights
(swapped in, then back), checkpoints store the averaged weights as ``state_dict``, the raw ones as
``current_model_state`` and the update count as ``averaging_state["n_averaged"]``, so the best checkpoint, the
test and the exports read the average, and a resume restores both. Buffers (BatchNorm statistics) are averaged
as with Lightning's default ``use_buffers=True``, integer buffers with torch's arithmetic for them, which stands in
for SWA's final BN re-estimation. Before the first update the average is only a copy: validation and checkpoints
then keep the raw weights.

Why not Lightning's callbacks: they update the average in ``on_train_batch_end`` through
``AveragedModel.update_parameters``, which reads its update count back from the device (``bool(n_averaged ==
0)``), launches about four kernels per tensor, and runs after the other callbacks' batch-end hooks have already
saved a stop checkpoint without that step's update; and its checkpoint hook assumes the raw weights are in
the model, which is not so during validation. Here the averaged copy is made when the fit starts, once the
model has its device, dtype and layout, and the update is a few multi-tensor ops
(``torch._foreach_lerp_`` for floating-point tensors) that the module calls inside its step, right after the
optimizer update, so a CUDA graph captures it with the step. Whether an update copies (the first) or averages
is decided on the host from a Python count; nothing is read back. Only the network (``pl_module.model``) is
averaged: the module's other buffers are running sums, not weights.

EMA updates after every optimizer step, inside the step. SWA updates once an epoch, after the epoch's last
step (outside a captured graph, with the same ops and an equal-weight average).
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn

_PREFIX = "model."  # where the network's tensors sit in the LightningModule's state_dict


class WeightAverage(L.Callback):
    """An average of ``pl_module.model``'s parameters and buffers, kept beside them on the same device.

    The module calls :meth:`update_in_step` inside its training step (after the optimizer update) and
    :meth:`after_step` after it; subclasses say which of them updates. ``count`` is the number of updates, on the
    host. ``swapped`` says whether the averaged values are in the model (validation, after training) and the raw
    ones in the copy; every checkpoint written at any moment stores each in its own place.
    """

    def __init__(self) -> None:
        self.count = 0
        self.swapped = False
        self._names: list[str] = []
        self._groups: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = []  # (averaged, model's) per dtype
        self._pending: dict[str, torch.Tensor] | None = None  # averaged tensors from a checkpoint, until fit start
        self._trainer: L.Trainer | None = None

    # ------------------------------------------------------------------ the update

    def update_in_step(self) -> None:
        """Called inside the training step, right after the optimizer update."""

    def after_step(self, epoch: int, last_of_epoch: bool) -> None:
        """Called by the training step after the optimizer step (and after a graph replay of it)."""

    @torch.no_grad()
    def _update(self) -> None:
        """Device work only: the first update copies, later ones average; decided on the host from ``count``.

        Inside a CUDA graph the captured ops replay as they were captured, so a capture must not record the
        first update's copy (the step's eager warm-up runs come first).
        """
        if self.count == 0:
            if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                raise RuntimeError("the average's first update copies the weights; capture the step after it")
            for averaged, current in self._groups:
                torch._foreach_copy_(averaged, current)
            return
        for averaged, current in self._groups:
            if averaged[0].is_floating_point():
                self._average_floats(averaged, current)
            else:
                self._average_integers(averaged, current)

    def _average_floats(self, averaged: list[torch.Tensor], current: list[torch.Tensor]) -> None:
        raise NotImplementedError

    def _average_integers(self, averaged: list[torch.Tensor], current: list[torch.Tensor]) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------ the copy

    @property
    def started(self) -> bool:
        """Whether the average holds an update (before it, it is only a copy of the initial weights)."""
        return self.count > 0

    def averaged_state(self) -> dict[str, torch.Tensor]:
        """The averaged tensors under their ``state_dict`` names, wherever they are (copy or model)."""
        return {
            name: tensor.detach()
            for name, tensor in zip(self._names, self._model_side() if self.swapped else self._copy_side(), strict=True)
        }

    def _copy_side(self) -> list[torch.Tensor]:
        return [t for averaged, _ in self._groups for t in averaged]

    def _model_side(self) -> list[torch.Tensor]:
        return [t for _, current in self._groups for t in current]

    def _build(self, pl_module: L.LightningModule) -> None:
        """The averaged copy, on the model's device and in its layout, grouped by dtype for multi-tensor ops."""
        network = pl_module.model
        named = [*network.named_parameters(), *network.named_buffers()]
        by_dtype: dict[tuple[torch.dtype, torch.device], list[tuple[str, torch.Tensor]]] = {}
        for name, tensor in named:
            by_dtype.setdefault((tensor.dtype, tensor.device), []).append((_PREFIX + name, tensor.detach()))
        self._names, self._groups = [], []
        for members in by_dtype.values():
            self._names += [name for name, _ in members]
            self._groups.append(([t.clone() for _, t in members], [t for _, t in members]))
        if self._pending is not None:
            self._load_pending()

    def _load_pending(self) -> None:
        assert self._pending is not None
        with torch.no_grad():
            for name, tensor in zip(self._names, self._copy_side(), strict=True):
                if name in self._pending:
                    tensor.copy_(self._pending[name])
        self._pending = None

    @torch.no_grad()
    def _swap(self) -> None:
        """Exchange the model's and the copy's values in place (a captured graph keeps both storages)."""
        for averaged, current in self._groups:
            kept = [t.clone() for t in averaged]
            torch._foreach_copy_(averaged, current)
            torch._foreach_copy_(current, kept)
        self.swapped = not self.swapped

    # ------------------------------------------------------------------ Lightning hooks

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer = trainer

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The strategy has moved the model to its device and the module has set its layout.
        self.swapped = False
        self._build(pl_module)

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING and self.started and not self.swapped:
            self._swap()

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING and self.swapped:
            self._swap()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The test and the exports use the average; the raw weights stay in the copy for any later save.
        if self.started and not self.swapped:
            self._swap()

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        """The averaged weights as ``state_dict``, the raw ones as ``current_model_state``, whichever of them the
        model holds at this moment (a stop during validation saves while the average is swapped in)."""
        if not self._groups or not self.started:
            return
        module_state = checkpoint["state_dict"]
        raw, averaged = dict(module_state), dict(module_state)
        model_side = dict(zip(self._names, self._model_side(), strict=True))
        copy_side = dict(zip(self._names, self._copy_side(), strict=True))
        raw_side, averaged_side = (copy_side, model_side) if self.swapped else (model_side, copy_side)
        for name in self._names:
            if name in module_state:
                raw[name] = raw_side[name].detach()
                averaged[name] = averaged_side[name].detach()
        checkpoint["state_dict"] = averaged
        checkpoint["current_model_state"] = raw
        checkpoint["averaging_state"] = {"n_averaged": torch.tensor(self.count, dtype=torch.int64)}

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Resume both: the model gets the raw weights (Lightning has just loaded the averaged ``state_dict``), the
        copy the averaged ones. Outside fitting (the test after a fit) the averaged ``state_dict`` is kept."""
        if trainer.state.fn != TrainerFn.FITTING:
            return
        if "current_model_state" not in checkpoint or "averaging_state" not in checkpoint:
            self.count = 0  # saved before the first update: the checkpoint holds the raw weights only
            return
        pl_module.load_state_dict(checkpoint["current_model_state"])
        self.count = int(checkpoint["averaging_state"]["n_averaged"])  # a tensor loaded on the CPU
        self._pending = {k: v for k, v in checkpoint["state_dict"].items() if k.startswith(_PREFIX)}
        if self._groups:  # strategies that restore after moving the model
            self.swapped = False
            self._load_pending()


class EMA(WeightAverage):
    """An exponential moving average of the weights, updated inside every training step: ``avg ← decay · avg + (1 −
    decay) · weights`` (torch's ``get_ema_avg_fn``), the first update a copy."""

    def __init__(self, decay: float) -> None:
        super().__init__()
        self.decay = decay

    def update_in_step(self) -> None:
        self._update()

    def after_step(self, epoch: int, last_of_epoch: bool) -> None:
        self.count += 1  # on the host, outside the step a graph replays

    def _average_floats(self, averaged: list[torch.Tensor], current: list[torch.Tensor]) -> None:
        torch._foreach_lerp_(averaged, current, 1.0 - self.decay)

    def _average_integers(self, averaged: list[torch.Tensor], current: list[torch.Tensor]) -> None:
        # torch's formula in floating point, truncated back into the integer tensors (lerp takes floats only).
        kept, added = torch._foreach_mul(averaged, self.decay), torch._foreach_mul(current, 1 - self.decay)
        torch._foreach_copy_(averaged, torch._foreach_add(kept, added))


class SWA(WeightAverage):
    """Stochastic weight averaging (Izmailov et al. 2018): the equal average of the weights after the last step of
    each of the run's last ``epochs`` epochs, trained at a constant LR (the schedule's part, see ``LRSchedule``).

    The update runs right after the epoch's last step, before that epoch's validation (which therefore sees the
    new average). Lightning's ``StochasticWeightAveraging`` callback is not used: it replaces the LR schedulers it
    finds in the trainer with ``SWALR``, and this module has none (its LR is a closed form written into a tensor).
    """

    def __init__(self, epochs: int) -> None:
        super().__init__()
        self.epochs = epochs

    def first_epoch(self) -> int:
        """The first epoch whose end is averaged."""
        assert self._trainer is not None
        return max(0, (self._trainer.max_epochs or 1) - self.epochs)

    def after_step(self, epoch: int, last_of_epoch: bool) -> None:
        if last_of_epoch and epoch >= self.first_epoch():
            self._update()
            self.count += 1

    def _average_floats(self, averaged: list[torch.Tensor], current: list[torch.Tensor]) -> None:
        torch._foreach_lerp_(averaged, current, 1.0 / (self.count + 1))

    def _average_integers(self, averaged: list[torch.Tensor], current: list[torch.Tensor]) -> None:
        # torch's avg + (new - avg) / (n + 1) in floating point, truncated back into the integer tensors.
        steps = torch._foreach_div(torch._foreach_sub(current, averaged), self.count + 1)
        torch._foreach_copy_(averaged, torch._foreach_add(steps, averaged))


def averaging_callback(ema: float, swa_epochs: int) -> WeightAverage | None:
    """The averaging of a run's options, or None; EMA and SWA exclude each other (checked by the caller)."""
    if ema > 0:
        return EMA(ema)
    if swa_epochs > 0:
        return SWA(swa_epochs)
    return None
