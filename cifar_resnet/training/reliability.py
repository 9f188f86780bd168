"""Nothing lost: atomic checkpoints, RNG state in checkpoints, graceful SIGTERM/SIGINT, divergence stop."""

from __future__ import annotations

import random
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins.io import AsyncCheckpointIO, TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException

from cifar_resnet.errors import UserError
from cifar_resnet.fileio import atomic_torch_save

# Exit statuses of a run stopped by a signal, as a shell reports a process killed by it (128 + signum).
EXIT_SIGINT = 128 + signal.SIGINT
EXIT_SIGTERM = 128 + signal.SIGTERM


class CheckpointWriteError(UserError):
    """A checkpoint could not be written (disk full, read-only folder); the previous file is intact."""


class NonFiniteWeightsError(UserError):
    """Training diverged: the loss or the weights are NaN or infinite."""


class TrainingInterruptedError(Exception):
    """SIGTERM or SIGINT stopped the run after a resumable checkpoint was written to ``checkpoint``."""

    def __init__(self, signum: int, checkpoint: Path | None) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum
        self.checkpoint = checkpoint

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def non_finite_tensors(state_dict: dict[str, Any], prefix: str = "model.") -> list[str]:
    """Names of floating-point tensors under ``prefix`` (the network's weights and buffers) holding NaN or inf.

    Metric states are left out: a running maximum legitimately starts at -inf.
    """
    return [
        name
        for name, value in state_dict.items()
        if name.startswith(prefix)
        and isinstance(value, torch.Tensor)
        and value.is_floating_point()
        and not bool(torch.isfinite(value).all())
    ]


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's TorchCheckpointIO, made crash-safe on local disks and strict about what it writes and reads.

    Lightning's own atomic save goes through an fsspec transaction that may move a temp file across
    filesystems and never fsyncs (lightning #20270, #21431). Here the temp file sits beside the target,
    is flushed and fsynced, ``os.replace``-d over the target, and the folder is fsynced: a kill at any
    moment leaves either the old or the new checkpoint, both loadable. Checkpoints with non-finite
    weights are refused, and every load uses ``weights_only=True``.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        target = Path(path)
        bad = non_finite_tensors(checkpoint.get("state_dict", {}))
        if bad:
            raise NonFiniteWeightsError(
                f"refusing to write {target.name} at step {checkpoint.get('global_step')}: weights are not finite "
                f"({bad[0]}{' and more' if len(bad) > 1 else ''}); training diverged, lower --lr. "
                f"Earlier checkpoints in {target.parent} are kept"
            )
        try:
            atomic_torch_save(checkpoint, target)
        except OSError as err:
            raise CheckpointWriteError(
                f"could not write checkpoint {target} ({err.strerror or err}); the previous {target.name}, "
                "if any, is intact; free space or fix permissions, then resume from it"
            ) from err

    def load_checkpoint(self, path: _PATH, map_location: Any | None = None, weights_only: bool | None = None) -> dict:
        # Checkpoints hold tensors and plain values only; refuse anything that needs unpickling code.
        return super().load_checkpoint(path, map_location=map_location or "cpu", weights_only=True)


class BackgroundCheckpointIO(AsyncCheckpointIO):
    """Checkpoints written by a background thread, so training goes on while a file of 90-190 MB is saved.

    Lightning's AsyncCheckpointIO snapshots the tensors on the training thread (a copy on the device, so
    later steps cannot change what is saved) and hands the write to one worker thread; here that write is
    :class:`AtomicCheckpointIO`'s. Removals of superseded checkpoints (the previous best) queue behind the
    writes on the same thread: an old best file is deleted only once its successor is complete on disk.
    Write errors surface at the next save or when the run ends, and every pending write finishes before
    the trainer tears down (also on SIGTERM and Ctrl-C).
    """

    def __init__(self) -> None:
        super().__init__(AtomicCheckpointIO())

    def remove_checkpoint(self, path: _PATH) -> None:
        self._ensure_setup()
        assert self._executor is not None and self.checkpoint_io is not None
        remove = self.checkpoint_io.remove_checkpoint

        def remove_in_order() -> None:
            try:
                remove(path)
            except BaseException as err:  # reported like a failed write: at the next save or teardown
                self._error = err

        self._executor.submit(remove_in_order)


class RNGState(Callback):
    """Saves the global RNGs (python, numpy, torch CPU and CUDA) in every checkpoint and restores them.

    Data order and augmentation derive from (seed, epoch) on their own; this keeps anything else that draws
    from the global generators (dropout, DataLoader worker seeds, user code) on the uninterrupted path.
    """

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "python": list(random.getstate()[1]),
            "python_version": random.getstate()[0],
            "python_gauss": random.getstate()[2],
            "numpy": {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in _numpy_state().items()},
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        random.setstate((state_dict["python_version"], tuple(state_dict["python"]), state_dict["python_gauss"]))
        np_state = state_dict["numpy"]
        np.random.set_state(
            (np_state["state"], np.asarray(np_state["key"], dtype=np.uint32), np_state["pos"],
             np_state["has_gauss"], np_state["cached_gaussian"])
        )  # fmt: skip
        torch.set_rng_state(state_dict["torch"])
        if "cuda" in state_dict and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state_dict["cuda"])


def _numpy_state() -> dict[str, Any]:
    name, key, pos, has_gauss, cached = np.random.get_state()
    return {"state": name, "key": key, "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}


class DivergenceStop(Callback):
    """Stops training after ``max_nonfinite`` consecutive non-finite training losses.

    The module's :class:`~cifar_resnet.training.step.TrainingTally` follows the streak on the device inside the
    training step; the host reads where a streak tripped only every ``check_every`` steps and at the end of
    each epoch, so the GPU's queue is drained rarely. Detection can therefore come up to ``check_every``
    steps late; the checkpoint IO refuses non-finite weights in the meantime.
    """

    def __init__(self, max_nonfinite: int = 3, check_every: int = 50) -> None:
        self.max_nonfinite = max_nonfinite
        self.check_every = max(check_every, max_nonfinite)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pl_module.tally.max_nonfinite = self.max_nonfinite

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step % self.check_every and batch_idx + 1 != trainer.num_training_batches:
            return
        first = int(pl_module.tally.diverged_at)  # the one host read, every check_every steps
        if first >= 0:
            lr = pl_module.lr_schedule(first) if pl_module.lr_schedule is not None else float("nan")
            raise NonFiniteWeightsError(
                f"training diverged: {self.max_nonfinite} consecutive non-finite losses from training step {first} "
                f"(lr then {lr:.3g}); no checkpoint was written after it; lower --lr (or raise "
                "--warmup_epochs) and resume from the last checkpoint or start again"
            )


class GracefulInterrupt(Callback):
    """On SIGTERM or Ctrl-C, finish the current batch, write a resumable ``last.ckpt`` and stop.

    SIGTERM goes through Lightning's own handler (``trainer.received_sigterm``, broadcast to all ranks; under
    SLURM Lightning also requeues). Lightning turns Ctrl-C into an immediate KeyboardInterrupt that can land
    in the middle of an optimizer step, so SIGINT is caught here instead and acted on at the next batch end;
    a second Ctrl-C interrupts at once.
    """

    def __init__(self, last: ModelCheckpoint | None = None) -> None:
        self.last = last
        self._pending: int | None = None
        self._previous: Any = None
        self.saved: Path | None = None
        self.signum: int | None = None

    def _on_sigint(self, signum: int, frame: FrameType | None) -> None:
        if self._pending is not None:
            raise KeyboardInterrupt
        self._pending = signal.SIGINT

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def _target(self, trainer: L.Trainer) -> Path:
        if self.last is not None and self.last.dirpath:
            return Path(self.last.dirpath) / "last.ckpt"
        return Path(trainer.default_root_dir) / "last.ckpt"

    def _save_and_stop(self, trainer: L.Trainer, signum: int) -> None:
        self.signum = signum
        target = self._target(trainer)
        trainer.save_checkpoint(target, weights_only=False)  # every rank calls it; rank 0 writes
        self.saved = target
        raise TrainingInterruptedError(signum, target)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._pending is not None:
            self._save_and_stop(trainer, self._pending)
        if trainer.received_sigterm:
            self._save_and_stop(trainer, signal.SIGTERM)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        # Lightning raises SIGTERMException itself outside training batches (e.g. during validation).
        if isinstance(exception, SIGTERMException) and self.saved is None:
            self.signum = signal.SIGTERM
            target = self._target(trainer)
            trainer.save_checkpoint(target, weights_only=False)
            self.saved = target


def sigterm_stop(trainer: L.Trainer) -> TrainingInterruptedError:
    """The error for a SIGTERM that Lightning turned into SIGTERMException (a SystemExit that exits 0)."""
    saved = next((cb.saved for cb in trainer.callbacks if isinstance(cb, GracefulInterrupt)), None)
    return TrainingInterruptedError(signal.SIGTERM, saved)
