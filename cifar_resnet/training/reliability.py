"""Nothing lost: atomic checkpoints, RNG state in checkpoints, graceful SIGTERM/SIGINT, divergence stop."""

from __future__ import annotations

import contextlib
import logging
import math
import random
import signal
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins import CheckpointIO
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning_utilities.core.apply_func import apply_to_collection

from cifar_resnet.errors import UserError
from cifar_resnet.fileio import atomic_torch_save
from cifar_resnet.training import lightning_compat

# Exit statuses of a run stopped by a signal, as a shell reports a process killed by it (128 + signum).
EXIT_SIGINT = 128 + signal.SIGINT
EXIT_SIGTERM = 128 + signal.SIGTERM

log = logging.getLogger(__name__)


class CheckpointWriteError(UserError):
    """A checkpoint could not be written (disk full, read-only folder); the previous file is intact."""


class NonFiniteWeightsError(UserError):
    """Training diverged: the loss or the weights are NaN or infinite."""


class TrainingInterruptedError(Exception):
    """SIGTERM or SIGINT stopped the run; ``checkpoint`` is where it can continue from (None: nothing to keep).

    ``phase`` says when it came (``before training``, ``during training``, ``after training``, ``during the
    final test``). ``written`` says whether this stop wrote ``checkpoint``; a checkpoint filled in later (the
    run's newest file, found after a stop that wrote none) is an older, complete one.
    """

    def __init__(self, signum: int, checkpoint: Path | None, phase: str = "during training") -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name} {phase}")
        self.signum = signum
        self.checkpoint = checkpoint
        self.phase = phase
        self.written = checkpoint is not None

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def _weights(state_dict: dict[str, Any], prefix: str) -> dict[str, torch.Tensor]:
    """Floating-point tensors under ``prefix`` (the network's weights and buffers). Metric states are left out:
    a running maximum legitimately starts at -inf."""
    return {
        name: value
        for name, value in state_dict.items()
        if name.startswith(prefix) and isinstance(value, torch.Tensor) and value.is_floating_point()
    }


def non_finite_tensors(state_dict: dict[str, Any], prefix: str = "model.") -> list[str]:
    """Names of floating-point tensors under ``prefix`` (the network's weights and buffers) holding NaN or inf.

    One host read per tensor: for host copies, or to name the culprits once :func:`weights_are_finite` said no.
    """
    return [name for name, value in _weights(state_dict, prefix).items() if not bool(torch.isfinite(value).all())]


def weights_are_finite(state_dict: dict[str, Any], prefix: str = "model.") -> torch.Tensor:
    """Whether every floating-point tensor under ``prefix`` is finite, as one boolean tensor on the weights' device.

    The largest magnitude over all of them, by torch's multi-tensor norm (a few kernels for any number of tensors,
    nothing read back): NaN and inf propagate into it, and unlike a 2-norm it cannot overflow on large finite
    values. Reading the flag is the caller's one sync.
    """
    weights = [value.detach() for value in _weights(state_dict, prefix).values() if value.numel()]
    if not weights:
        return torch.tensor(True)
    return torch.isfinite(torch.nn.utils.get_total_norm(weights, norm_type=math.inf))


def refuse_non_finite(bad: list[str], target: Path, step: Any) -> NonFiniteWeightsError:
    """The refusal of a checkpoint whose weights ``bad`` are not finite."""
    return NonFiniteWeightsError(
        f"refusing to write {target.name} at step {step}: weights are not finite "
        f"({bad[0] if bad else 'the weights'}{' and more' if len(bad) > 1 else ''}); training diverged, lower --lr. "
        f"Earlier checkpoints in {target.parent} are kept"
    )


def _write_failure(err: BaseException) -> OSError | RuntimeError | None:
    """The file-system error behind ``err``, if it is one: an OSError, or torch's RuntimeError from its zip writer
    (``[enforce fail at inline_container.cc ...]``, raised while handling the OSError of a full disk or a file-size
    limit). Anything else is not a write failure and is left alone."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, OSError):
            return seen
        seen = seen.__cause__ or seen.__context__
    if isinstance(err, RuntimeError) and ("inline_container" in str(err) or "PytorchStreamWriter" in str(err)):
        return err
    return None


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
            raise refuse_non_finite(bad, target, checkpoint.get("global_step"))
        self.write(checkpoint, target)

    @staticmethod
    def write(checkpoint: dict[str, Any], target: Path) -> None:
        """Write ``checkpoint`` atomically, unchecked; a full disk or a refused write is a CheckpointWriteError."""
        try:
            atomic_torch_save(checkpoint, target)
        except (OSError, RuntimeError) as err:
            failure = _write_failure(err)
            if failure is None:
                raise
            reason = failure.strerror if isinstance(failure, OSError) and failure.strerror else str(failure)
            raise CheckpointWriteError(
                f"could not write checkpoint {target} ({reason.splitlines()[0]}); the previous {target.name}, "
                "if any, is intact; free space or fix permissions, then resume from it"
            ) from err

    def load_checkpoint(self, path: _PATH, map_location: Any | None = None, weights_only: bool | None = None) -> dict:
        # Checkpoints hold tensors and plain values only; refuse anything that needs unpickling code.
        return super().load_checkpoint(path, map_location=map_location or "cpu", weights_only=True)


class HostCopier:
    """Copies every tensor of a checkpoint into host memory with one wait for the device.

    CUDA tensors go into pinned host memory with ``non_blocking`` copies queued on the current stream (after the
    steps that produced them), then the stream is synchronised once. If pinned memory cannot be had, the copies
    go to ordinary (pageable) memory for the rest of the run; such a copy returns only once done, and the one
    synchronise still follows. CPU tensors are copied too: training changes them in place. Other devices copy
    blocking. Layouts are kept (``empty_like``), so a channels_last tensor is saved as channels_last.

    The host buffers are kept and reused by the next call (allocating and first touching some 200 MB each save
    costs more than the copy), so a call's copies are valid until the next call. :class:`BackgroundCheckpointIO`
    copies only once the previous write is done, so the writer never sees a buffer change under it.
    """

    def __init__(self) -> None:
        self.pin = True
        self._buffers: dict[tuple[Any, ...], list[torch.Tensor]] = {}

    def __call__(self, tree: Any) -> Any:
        cuda_devices: set[torch.device] = set()
        spare = {key: list(buffers) for key, buffers in self._buffers.items()}
        used: dict[tuple[Any, ...], list[torch.Tensor]] = {}

        def copy(tensor: torch.Tensor) -> torch.Tensor:
            tensor = tensor.detach()
            if tensor.device.type not in ("cpu", "cuda"):
                return tensor.to("cpu")
            pinned = tensor.device.type == "cuda"
            key = (tensor.dtype, tensor.shape, tensor.stride(), pinned)
            host = spare[key].pop() if spare.get(key) else self._host_buffer(tensor, pinned)
            used.setdefault(key, []).append(host)
            if pinned:
                cuda_devices.add(tensor.device)
            return host.copy_(tensor, non_blocking=host.is_pinned())

        copied = apply_to_collection(tree, torch.Tensor, copy)
        for device in cuda_devices:  # the one wait: every copy above is queued on this stream
            torch.cuda.current_stream(device).synchronize()
        self._buffers = used
        return copied

    def _host_buffer(self, tensor: torch.Tensor, pinned: bool) -> torch.Tensor:
        if pinned and self.pin:
            try:
                return torch.empty_like(tensor, device="cpu", pin_memory=True)
            except RuntimeError as err:  # no pinnable memory left (or no driver to pin with): pageable instead
                self.pin = False
                log.info("checkpoint copies go to pageable host memory: %s", (str(err) or repr(err)).splitlines()[0])
        return torch.empty_like(tensor, device="cpu")


class BackgroundCheckpointIO(CheckpointIO):
    """Checkpoints written by a background thread, costing the training thread one wait for the device per save.

    Per save, on the training thread: one fused finiteness check of the weights (:func:`weights_are_finite`, a
    flag left on the device), one copy of every tensor and of the flag into host memory, one synchronise, one
    read of the flag; non-finite weights are refused there. The writer thread gets host tensors only and writes
    them with :class:`AtomicCheckpointIO`'s crash-safe write. At most one write is pending: a save waits for it
    first, except a save marked :meth:`skippable` (the mid-epoch ``--ckpt_every_n_steps`` ones), which is
    dropped while a write is under way. Removals of superseded checkpoints (the previous best) queue behind the
    writes on the same thread: an old best is deleted only once its successor is complete on disk.

    Lightning's AsyncCheckpointIO is not used: it clones every tensor on the device and lets the writer read
    each clone back (one sync per tensor, waiting behind all queued steps), and its queue has no bound. A failed
    write is raised by the next save, by :meth:`raise_failure` (a :class:`CheckpointWriteWatch` calls it at every
    batch end) and at teardown, which waits for the pending write; also on SIGTERM and Ctrl-C.
    """

    def __init__(self, signals: StopSignals | None = None) -> None:
        super().__init__()
        self.writer = AtomicCheckpointIO()
        self.copy_to_host = HostCopier()
        self.signals = signals
        self._executor: ThreadPoolExecutor | None = None
        self._pending: Future[None] | None = None  # the newest job given to the writer thread
        self._error: BaseException | None = None
        self._calls = 0  # the training thread is inside a save or a removal
        self._skippable = False
        self._told_skip = False
        self._idle_lock = threading.Lock()
        if signals is not None:
            signals.defer_while(self.busy)

    def busy(self) -> bool:
        """Whether a checkpoint is being copied, written or removed: a second Ctrl-C waits for the end of it."""
        pending = self._pending
        return self._calls > 0 or (pending is not None and not pending.done())

    @contextlib.contextmanager
    def skippable(self) -> Iterator[None]:
        """Saves inside may be dropped while a write is pending (checkpoints that a later one soon replaces)."""
        self._skippable = True
        try:
            yield
        finally:
            self._skippable = False

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        target = Path(path)
        with self._training_thread_call():
            self.raise_failure()
            if self._skippable and self._writing():
                if not self._told_skip:
                    log.info("a mid-epoch checkpoint was skipped: the previous write was still under way")
                    self._told_skip = True
                return
            self.wait()
            state = checkpoint.get("state_dict", {})
            host, finite = self.copy_to_host((checkpoint, weights_are_finite(state)))
            if not bool(finite):  # a read of host memory: the copy above already waited for the device
                raise refuse_non_finite(non_finite_tensors(host.get("state_dict", {})), target, host.get("global_step"))
            self._submit(lambda: self.writer.write(host, target))

    def remove_checkpoint(self, path: _PATH) -> None:
        with self._training_thread_call():
            self._submit(lambda: self.writer.remove_checkpoint(path))

    def load_checkpoint(self, path: _PATH, map_location: Any | None = None, weights_only: bool | None = None) -> dict:
        return self.writer.load_checkpoint(path, map_location=map_location, weights_only=weights_only)

    def wait(self) -> None:
        """Block until the pending write (and the removals queued behind it) is done; raise its failure, if any."""
        with self._training_thread_call():
            pending = self._pending
            if pending is not None:
                pending.result()
            self.raise_failure()

    @property
    def failed(self) -> bool:
        """Whether a write or a removal failed."""
        return self._error is not None

    def raise_failure(self) -> None:
        """Raise the error of a write that failed (the previous file of that name is intact)."""
        if self._error is not None:
            raise self._error

    def teardown(self) -> None:
        """Wait for the pending write and stop the writer thread; a failed write is raised here at the latest."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        self.raise_failure()

    def _writing(self) -> bool:
        pending = self._pending
        return pending is not None and not pending.done()

    def _submit(self, job: Callable[[], None]) -> None:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-writer")

        def run() -> None:
            try:
                job()
            except BaseException as err:  # raised on the training thread: at the next batch end, save or teardown
                self._error = self._error or err

        self._pending = self._executor.submit(run)
        self._pending.add_done_callback(lambda _: self._notify_idle())

    @contextlib.contextmanager
    def _training_thread_call(self) -> Iterator[None]:
        self._calls += 1
        try:
            yield
        finally:
            self._calls -= 1
            self._notify_idle()

    def _notify_idle(self) -> None:
        """Called from either thread whenever a job or a call ends: if nothing is left, deferred signals go on."""
        if self.signals is None:
            return
        with self._idle_lock:
            if not self.busy():
                self.signals.release()


class CheckpointWriteWatch(Callback):
    """Stops the run at the first batch end after a background checkpoint write failed, instead of training on
    with nothing saved. The failure (a full disk, a file-size limit, a read-only folder) is raised as it is: one
    line naming the file; the previous file of that name is intact.

    In a multi-process run only the first process writes; the processes agree every ``sync_every`` steps (the
    same steps as :class:`GracefulInterrupt`) so that all of them stop together.
    """

    def __init__(self, sync_every: int = 10) -> None:
        self.sync_every = sync_every

    @staticmethod
    def _writer(trainer: L.Trainer) -> BackgroundCheckpointIO | None:
        io = trainer.strategy.checkpoint_io
        return io if isinstance(io, BackgroundCheckpointIO) else None

    def _check(self, trainer: L.Trainer) -> None:
        writer = self._writer(trainer)
        failed = writer is not None and writer.failed
        if trainer.world_size > 1:
            if trainer.global_step % self.sync_every or not trainer.strategy.reduce_boolean_decision(failed, all=False):
                return
            if not failed:
                raise CheckpointWriteError("could not write a checkpoint in the first process of the run; see its "
                                           "error, fix it, then resume from the previous checkpoint")  # fmt: skip
        if writer is not None:
            writer.raise_failure()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._check(trainer)

    def on_validation_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:  # fmt: skip
        if trainer.world_size == 1 and trainer.state.fn == "fit":
            self._check(trainer)


class StepCheckpoint(ModelCheckpoint):
    """The mid-epoch ``last.ckpt`` of ``--ckpt_every_n_steps``: skipped while the previous write is under way.

    The skip is decided by the checkpoint IO in the process that writes, after every process has entered
    ``trainer.save_checkpoint`` together (deciding before it would leave the others waiting at its barrier).
    """

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        writer = trainer.strategy.checkpoint_io
        if not isinstance(writer, BackgroundCheckpointIO):
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            return
        with writer.skippable():
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    @property
    def state_key(self) -> str:
        # Saved under ModelCheckpoint's key, so checkpoints from before this class resume with their record.
        return super().state_key.replace(type(self).__qualname__, ModelCheckpoint.__qualname__, 1)


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

    A signal that would stop at once is held back while a checkpoint is copied, written or removed (see
    :meth:`defer_while`): stopping then would leave the writer thread inside torch's C++ code as the interpreter
    exits, which aborts the process (``terminate called without an active exception``) and loses the file. It is
    delivered again once the checkpoint is complete (:meth:`release`). Once a stop is under way (``stopping``),
    later signals are recorded only: the stop ends the run as soon as its checkpoint is on disk.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self.training = False
        self.stopping = False
        self.phase = "before training"  # for a signal that stops at once
        self._previous: dict[int, Any] = {}
        self._busy: list[Callable[[], bool]] = []
        self._deferred: int | None = None

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self.handle)
        return self

    def __exit__(self, *_: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def defer_while(self, busy: Callable[[], bool]) -> None:
        """Hold back signals that would stop at once while ``busy()``; its owner calls :meth:`release` after."""
        self._busy.append(busy)

    def release(self) -> None:
        """Deliver a held-back signal again, to the main thread (the only one a stop can be raised in)."""
        signum, self._deferred = self._deferred, None
        if signum is not None and self._previous and not self.stopping:
            main = threading.main_thread().ident
            if main is not None:
                signal.pthread_kill(main, signum)

    def handle(self, signum: int, frame: FrameType | None) -> None:
        repeated = self.signum is not None
        self.signum = self.signum or signum
        if self.stopping:
            return
        stops_at_once = not self.training or (repeated and signum == signal.SIGINT)
        if not stops_at_once:
            return  # GracefulInterrupt saves and stops at the next batch end
        if any(busy() for busy in self._busy):
            self._deferred = signum
            return
        self.stopping = True
        if not self.training:
            raise TrainingInterruptedError(signum, None, self.phase)
        raise TrainingInterruptedError(signum, None, "at once (a second Ctrl-C)")  # without waiting for the batch

    def phase_done(self, phase: str, checkpoint: Path | None) -> None:
        """After a phase that finished although a signal came: stop now, pointing at ``checkpoint``."""
        if self.signum is not None:
            self.stopping = True
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
        self.signals.stopping = True  # a further signal must not cut the save short
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
            self.signals.stopping = True
            target = self._target(trainer)
            if trainer.current_epoch >= (trainer.max_epochs or 0) and target.is_file():
                # Training is complete and its last epoch's checkpoint written: a save now would only differ from
                # it in Lightning's epoch counter, and the resumed run goes straight to the final test.
                self.saved = target
                return
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
