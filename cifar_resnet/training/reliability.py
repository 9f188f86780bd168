"""Nothing lost: atomic checkpoints, RNG state in checkpoints, graceful SIGTERM/SIGINT, divergence stop."""

from __future__ import annotations

import random
import signal
import threading
from collections.abc import Callable
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
from cifar_resnet.training import lightning_compat

# Exit statuses of a run stopped by a signal, as a shell reports a process killed by it (128 + signum).
EXIT_SIGINT = 128 + signal.SIGINT
EXIT_SIGTERM = 128 + signal.SIGTERM


class CheckpointWriteError(UserError):
    """A checkpoint could not be written (disk full, read-only folder); the previous file is intact."""


class NonFiniteWeightsError(UserError):
    """Training diverged: the loss or the weights are NaN or infinite."""


class TrainingInterruptedError(Exception):
    """SIGTERM or SIGINT stopped the run; ``checkpoint`` is where it can continue from (None: nothing to keep).

    ``phase`` says when it came (``before training``, ``during training``, ``after training``, ``during the
    final test``).
    """

    def __init__(self, signum: int, checkpoint: Path | None, phase: str = "during training") -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name} {phase}")
        self.signum = signum
        self.checkpoint = checkpoint
        self.phase = phase

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


class StopSignals:
    """SIGINT (Ctrl-C) and SIGTERM for the whole of a fit, installed by the script around it.

    Before training starts (decoding data, building the model) and after it ends (the final test) a signal
    stops the run at once: nothing would be lost. While training, the first signal is only recorded, and
    :class:`GracefulInterrupt` acts on it at the next batch end, after writing a checkpoint. A second Ctrl-C
    stops at once. Lightning adds its own SIGTERM handler while it trains and calls this one as well.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self.training = False
        self.phase = "before training"  # for a signal that stops at once
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self.handle)
        return self

    def __exit__(self, *_: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def handle(self, signum: int, frame: FrameType | None) -> None:
        repeated = self.signum is not None
        self.signum = self.signum or signum
        if not self.training:
            raise TrainingInterruptedError(signum, None, self.phase)
        if repeated and signum == signal.SIGINT:  # a second Ctrl-C: stop without waiting for the batch to end
            raise TrainingInterruptedError(signum, None, "at once (a second Ctrl-C)")

    def phase_done(self, phase: str, checkpoint: Path | None) -> None:
        """After a phase that finished although a signal came: stop now, pointing at ``checkpoint``."""
        if self.signum is not None:
            raise TrainingInterruptedError(self.signum, checkpoint, phase)


class GracefulInterrupt(Callback):
    """Acts on a recorded SIGTERM or Ctrl-C: at the end of a training or validation batch it writes a resumable
    ``last.ckpt`` and stops the run. Before the first step there is nothing to keep, so it stops without one.

    Lightning also raises its own SIGTERMException outside training batches; a checkpoint is written then too.
    In a multi-process run the processes agree every ``sync_every`` steps whether any of them got a signal (one
    small all-reduce; Lightning itself broadcasts rank 0's SIGTERM every step), and then all of them stop.
    """

    def __init__(
        self, last: ModelCheckpoint | None = None, signals: StopSignals | None = None, sync_every: int = 10
    ) -> None:
        self.last = last
        self.sync_every = sync_every
        self.signals = signals or StopSignals()
        self.saved: Path | None = None
        self.signum: int | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.signals.signum is not None:  # came while the data was decoded or the checkpoint restored
            raise TrainingInterruptedError(self.signals.signum, None, "before training")
        self.signals.training = True
        if trainer.world_size > 1 and threading.current_thread() is threading.main_thread():
            # Lightning's SIGTERM handler broadcasts from inside the handler, which deadlocks when the signal
            # lands while the processes are in another collective (a gradient all-reduce). Ours only records the
            # signal (the processes then agree at a step, below) and, like Lightning's, passes it on to the
            # processes this one launched. Lightning restores the handler it replaced when it tears down.
            signal.signal(signal.SIGTERM, self._forwarding_handler(trainer))

    def _forwarding_handler(self, trainer: L.Trainer) -> Callable[[int, FrameType | None], None]:
        launcher = trainer.strategy.launcher

        def handle(signum: int, frame: FrameType | None) -> None:
            if self.signals.signum is None and launcher is not None:
                launcher.kill(signum)
            self.signals.handle(signum, frame)

        return handle

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.signals.training = False
        self.signals.phase = "after training, before the final test"

    def _target(self, trainer: L.Trainer) -> Path:
        if self.last is not None and self.last.dirpath:
            return Path(self.last.dirpath) / "last.ckpt"
        return Path(trainer.default_root_dir) / "last.ckpt"

    def _save_and_stop(self, trainer: L.Trainer, signum: int, phase: str) -> None:
        self.signum = signum
        target = self._target(trainer)
        trainer.save_checkpoint(target, weights_only=False)  # every rank calls it; rank 0 writes
        self.saved = target
        raise TrainingInterruptedError(signum, target, phase)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        signum = self.signals.signum or (signal.SIGTERM if trainer.received_sigterm else None)
        if trainer.world_size > 1:
            # The processes of a run stop together or not at all: one that saved while the others trained on
            # would wait in a collective nobody else joins. They decide at the same steps, every sync_every.
            if trainer.global_step % self.sync_every:
                return
            if not trainer.strategy.reduce_boolean_decision(signum is not None, all=False):
                return
            signum = signum or signal.SIGTERM  # the signal reached another process first
        if signum is not None:
            self._save_and_stop(trainer, signum, "during training")

    def on_validation_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:  # fmt: skip
        # The checkpoint written here resumes by running this validation again (ValidationRerun).
        if trainer.world_size > 1:  # processes stop together, at a training step (above)
            return
        signum = self.signals.signum or (signal.SIGTERM if trainer.received_sigterm else None)
        if signum is not None and trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._save_and_stop(trainer, signum, "during validation")

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        # Lightning raises SIGTERMException itself outside training batches (e.g. during validation).
        if isinstance(exception, SIGTERMException) and self.saved is None and self.signals.training:
            self.signum = signal.SIGTERM
            target = self._target(trainer)
            trainer.save_checkpoint(target, weights_only=False)
            self.saved = target


class RunFolderRelocation(Callback):
    """Lets a moved or copied run folder resume with its best-checkpoint record.

    Lightning restores ModelCheckpoint's record (best score and path, the top-k files) only when the stored
    folder equals the current one, and otherwise starts the record afresh, which can keep a worse "best".
    Before the callbacks load their state, paths inside the run's old ``checkpoints/`` folder are moved to
    the folder of the checkpoint being resumed.
    """

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        resumed = Path(trainer.ckpt_path).resolve() if trainer.ckpt_path else None
        if resumed is None or resumed.parent.name != "checkpoints":
            return
        new_dir = str(resumed.parent)
        for key, state in checkpoint.get("callbacks", {}).items():
            old_dir = state.get("dirpath") if key.startswith("ModelCheckpoint") and isinstance(state, dict) else None
            if not old_dir or old_dir == new_dir:
                continue

            def moved(path: Any, old_dir: str = old_dir) -> Any:
                if isinstance(path, str) and path and Path(path).parent == Path(old_dir):
                    return str(Path(new_dir) / Path(path).name)
                return path

            state["dirpath"] = new_dir
            for field_name in ("best_model_path", "kth_best_model_path", "last_model_path"):
                if field_name in state:
                    state[field_name] = moved(state[field_name])
            if isinstance(state.get("best_k_models"), dict):
                state["best_k_models"] = {moved(path): score for path, score in state["best_k_models"].items()}


def sigterm_stop(trainer: L.Trainer, phase: str = "during training") -> TrainingInterruptedError:
    """The error for a SIGTERM that Lightning turned into SIGTERMException (a SystemExit that exits 0)."""
    saved = next((cb.saved for cb in trainer.callbacks if isinstance(cb, GracefulInterrupt)), None)
    return TrainingInterruptedError(signal.SIGTERM, saved, phase if saved is not None else "before training")


class ValidationRerun(Callback):
    """A checkpoint written after an epoch's training but before its validation finished resumes by running that
    validation again, from its first batch.

    Such checkpoints come from a stop during validation and from a step checkpoint (``--ckpt_every_n_steps``) at an
    epoch's last batch; left as Lightning writes them, a resumed run would never validate that epoch, so its best
    checkpoint, ``val/acc_best`` and the run's record would differ from an uninterrupted run's.
    """

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if lightning_compat.validation_unfinished(trainer):
            lightning_compat.mark_validation_pending(checkpoint)
