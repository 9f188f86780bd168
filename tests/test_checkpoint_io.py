"""The checkpoint writer: what a save costs the training thread, one pending write, failed writes, a second Ctrl-C."""

from __future__ import annotations

import errno
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning_utilities.core.apply_func import apply_to_collection
from torch.utils._python_dispatch import TorchDispatchMode

from cifar_resnet import fileio
from cifar_resnet.cli import fit as cli
from cifar_resnet.models import create_model
from cifar_resnet.training import reliability
from cifar_resnet.training.module import ImageClassifier
from cifar_resnet.training.reliability import BackgroundCheckpointIO, HostCopier, weights_are_finite
from tests.helpers import FIT, fit_args, load_checkpoint, script_env

pytestmark = pytest.mark.reliability

GUARD = 60.0  # seconds; only against a hang: every wait below is for a state


def wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + GUARD
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what}")
        time.sleep(0.001)


def checkpoint_of(model: torch.nn.Module, step: int) -> dict[str, Any]:
    """A checkpoint shaped as Lightning's: the weights under ``model.``, optimizer state, RNG state, counters."""
    state = {f"model.{name}": value for name, value in model.state_dict().items()}
    momentum = {i: {"momentum_buffer": torch.randn_like(p)} for i, p in enumerate(model.parameters())}
    return {
        "global_step": step,
        "state_dict": state,
        "optimizer_states": [{"state": momentum, "param_groups": [{"lr": 0.1}]}],
        "callbacks": {"RNGState": {"torch": torch.get_rng_state()}},
    }


class ValueReads(TorchDispatchMode):
    """Counts reads of tensor values into Python (``bool(t)``, ``t.item()``): each one a sync on a GPU."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default):
            self.reads += 1
        return func(*args, **(kwargs or {}))


# ---------------------------------------------------------------------------------------------- the cost of a save


def test_a_save_reads_one_value_and_hands_the_writer_host_copies_that_training_cannot_change(tmp_path, monkeypatch):
    model = create_model("resnet20")
    checkpoint = checkpoint_of(model, 7)
    received: list[tuple[str, dict]] = []
    reads_in_writer: list[int] = []

    def recording_save(obj: dict, target: Path) -> None:  # the writer thread: it must have nothing left to read
        with ValueReads() as mode:
            received.append((threading.current_thread().name, obj))
            fileio.atomic_torch_save(obj, target)
        reads_in_writer.append(mode.reads)

    real_bool = torch.Tensor.__bool__
    python_reads: list[str] = []

    def counted_bool(self: torch.Tensor) -> bool:  # any thread: dispatch modes are per thread
        python_reads.append(threading.current_thread().name)
        return real_bool(self)

    monkeypatch.setattr(reliability, "atomic_torch_save", recording_save)
    monkeypatch.setattr(torch.Tensor, "__bool__", counted_bool)
    expected = {name: value.clone() for name, value in checkpoint["state_dict"].items()}
    io = BackgroundCheckpointIO()
    with ValueReads() as mode:
        io.save_checkpoint(checkpoint, tmp_path / "last.ckpt")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1)  # training goes on while the file is written: it holds the state at the save
    io.teardown()
    monkeypatch.undo()

    assert mode.reads == 1, f"{mode.reads} value reads on the training thread for one save; one fused check expected"
    assert len(python_reads) == 1 and python_reads[0] == threading.current_thread().name, python_reads
    assert reads_in_writer == [0]
    ((thread, handed),) = received
    assert thread != threading.current_thread().name, "written by the writer thread"
    tensors: list[torch.Tensor] = []
    apply_to_collection(handed, torch.Tensor, tensors.append)
    assert len(tensors) == len(list(model.parameters())) + len(model.state_dict()) + 1
    assert all(t.device.type == "cpu" for t in tensors)
    live = {t.untyped_storage().data_ptr() for t in model.state_dict().values()}
    assert not live & {t.untyped_storage().data_ptr() for t in tensors}, "copies, not the live weights"
    saved = load_checkpoint(tmp_path / "last.ckpt")["state_dict"]
    assert saved.keys() == expected.keys() and all(torch.equal(saved[k], v) for k, v in expected.items())


def test_non_finite_weights_are_refused_by_the_one_check_and_named(tmp_path: Path):
    model = create_model("resnet20")
    checkpoint = checkpoint_of(model, 12)
    checkpoint["state_dict"]["model.fc.weight"][0, 0] = float("nan")
    checkpoint["state_dict"]["model.fc.bias"][1] = float("-inf")
    io = BackgroundCheckpointIO()
    with pytest.raises(reliability.NonFiniteWeightsError, match=r"refusing to write last\.ckpt at step 12: weights are "
                       r"not finite \(model\.fc\.weight and more\); training diverged, lower --lr"):  # fmt: skip
        io.save_checkpoint(checkpoint, tmp_path / "last.ckpt")
    io.teardown()
    assert not (tmp_path / "last.ckpt").exists()
    # Large finite weights are finite (a 2-norm of them would overflow); metric states may hold -inf.
    huge = {"model.w": torch.full((4,), 3e38), "val_acc_best.max": torch.tensor(float("-inf"))}
    assert bool(weights_are_finite(huge))


def test_host_copies_fall_back_to_pageable_memory_when_pinning_fails_and_keep_the_layout():
    copier = HostCopier()
    weight = torch.randn(8, 3, 3, 3).to(memory_format=torch.channels_last)
    # Pinning needs a CUDA driver: without one (this CPU machine) it fails as on a host out of pinnable memory.
    if torch.cuda.is_available():
        pytest.skip("pinning works here; the fallback is exercised where it fails")
    buffer = copier._host_buffer(weight, pinned=True)
    assert not copier.pin, "the failure switches pinning off for the rest of the run"
    assert buffer.device.type == "cpu" and not buffer.is_pinned()
    assert buffer.shape == weight.shape and buffer.stride() == weight.stride(), "channels_last stays channels_last"
    copied = copier({"w": weight})["w"]
    assert torch.equal(copied, weight) and copied.stride() == weight.stride()


# ---------------------------------------------------------------------------------------------- one pending write


def test_one_write_pending_a_step_save_meanwhile_is_skipped_and_an_epoch_save_waits(tmp_path, monkeypatch, caplog):
    release, started = threading.Event(), threading.Event()
    events: list[str] = []
    real_save = fileio.atomic_torch_save

    def slow_save(obj: dict, target: Path) -> None:
        step = obj["global_step"]
        events.append(f"write {step} started")
        if step == 1:
            started.set()
            wait_for(release.is_set, "the test releases the first write")
        real_save(obj, target)
        events.append(f"write {step} done")

    monkeypatch.setattr(reliability, "atomic_torch_save", slow_save)
    io = BackgroundCheckpointIO()
    weights = torch.zeros(3)
    io.save_checkpoint({"global_step": 1, "state_dict": {"model.w": weights}}, tmp_path / "a.ckpt")
    wait_for(started.is_set, "the first write started")
    with caplog.at_level(logging.INFO, logger=reliability.__name__):
        for step in (2, 3):
            with io.skippable():  # mid-epoch saves while the first is written: dropped, not queued
                io.save_checkpoint({"global_step": step, "state_dict": {"model.w": weights}}, tmp_path / "b.ckpt")
    assert [r.message for r in caplog.records if "skipped" in r.message] == [
        "a mid-epoch checkpoint was skipped: the previous write was still under way"
    ], "said once"

    # An epoch-end save waits for the pending write: it is handed over only after the first one is done.
    weights.add_(4)
    epoch_save = threading.Thread(
        target=lambda: io.save_checkpoint({"global_step": 4, "state_dict": {"model.w": weights}}, tmp_path / "c.ckpt")
    )
    entered_wait = threading.Event()
    real_wait = io.wait

    def observed_wait() -> None:
        entered_wait.set()
        real_wait()

    monkeypatch.setattr(io, "wait", observed_wait, raising=False)
    epoch_save.start()
    wait_for(lambda: entered_wait.is_set() or not epoch_save.is_alive(), "the epoch save waits or returns")
    assert epoch_save.is_alive() and events == ["write 1 started"], "the epoch save must wait for the pending write"
    release.set()
    epoch_save.join(GUARD)
    io.teardown()
    assert events == ["write 1 started", "write 1 done", "write 4 started", "write 4 done"]
    assert not (tmp_path / "b.ckpt").exists()
    assert torch.equal(load_checkpoint(tmp_path / "c.ckpt")["state_dict"]["model.w"], torch.full((3,), 4.0))


# ---------------------------------------------------------------------------------------------- a failed write


def _failing_write(kind: str) -> Callable[[object, Path], None]:
    """The atomic write, failing as a full disk does: ENOSPC at fsync (an OSError), or a write refused inside
    torch.save (EFBIG, a file-size limit), which torch turns into its own RuntimeError."""

    def write(obj: object, target: Path) -> None:
        if kind == "enospc":

            def fill_then_fail(f) -> None:
                torch.save(obj, f)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

            fileio._atomic_write(target, fill_then_fail)
        else:

            class LimitedFile:
                def __init__(self, f) -> None:
                    self.f, self.written = f, 0

                def write(self, data: bytes) -> int:
                    self.written += len(data)
                    if self.written > 4096:
                        raise OSError(errno.EFBIG, os.strerror(errno.EFBIG))
                    return self.f.write(data)

                def flush(self) -> None:
                    self.f.flush()

            fileio._atomic_write(target, lambda f: torch.save(obj, LimitedFile(f)))

    return write


@pytest.mark.parametrize(("kind", "reason"), [("enospc", "No space left on device"), ("efbig", "File too large")])
def test_a_failed_write_stops_the_run_at_the_next_batch_end_with_one_line_and_keeps_the_previous_last(
    kind: str, reason: str, tiny_folder: Path, tmp_path: Path, monkeypatch, capsys
):
    logs = tmp_path / "logs"
    last = logs / "resnet20" / "version_0" / "checkpoints" / "last.ckpt"
    real_save, fail = fileio.atomic_torch_save, _failing_write(kind)
    last_writes: list[int] = []

    def save(obj: dict, target: Path) -> None:
        if target.name == "last.ckpt":
            last_writes.append(obj["global_step"])
            if len(last_writes) > 1:  # epoch 1's last.ckpt and every later one
                fail(obj, target)
                return
        real_save(obj, target)

    steps: list[int] = []
    reported: list[int] = []  # steps that began once the writer had reported its failure
    plain_step = ImageClassifier.training_step

    def step(self, batch, batch_idx):
        steps.append(self.trainer.global_step)
        if self.trainer.global_step == 6:  # the first batch after epoch 1: its last.ckpt failed in the background
            io = self.trainer.strategy.checkpoint_io
            wait_for(lambda: getattr(io, "failed", False), "the failed write is reported to the training thread")
            reported.append(self.trainer.global_step)
        return plain_step(self, batch, batch_idx)

    monkeypatch.setattr(reliability, "atomic_torch_save", save)
    monkeypatch.setattr(ImageClassifier, "training_step", step)
    # Epoch 0's files are written; epoch 1's last.ckpt fails while epoch 2 trains.
    code = cli.main(fit_args(tiny_folder, logs, "--max_epochs", "4", "--no_test"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"fit.py: error: could not write checkpoint {last} ({reason}); the previous last.ckpt"), (
        err
    )
    assert reported == [6] and steps == [0, 1, 2, 3, 4, 5, 6], "stopped at the end of the first batch after it"
    assert last_writes == [3, 6]
    kept = load_checkpoint(last)
    assert (kept["epoch"], kept["global_step"]) == (0, 3), "the previous last.ckpt is intact"
    assert not list(last.parent.glob(".*.tmp"))


# ---------------------------------------------------------------------------------------------- a second Ctrl-C


def _count_handler_calls(monkeypatch) -> list[int]:
    calls: list[int] = []
    plain = reliability.StopSignals.handle

    def counted(self, signum, frame):
        calls.append(signum)
        return plain(self, signum, frame)

    monkeypatch.setattr(reliability.StopSignals, "handle", counted)
    return calls


def test_a_second_ctrl_c_while_the_stop_checkpoint_is_written_waits_for_it(
    tiny_folder: Path, tmp_path: Path, monkeypatch, capsys
):
    logs = tmp_path / "logs"
    last = logs / "resnet20" / "version_0" / "checkpoints" / "last.ckpt"
    calls = _count_handler_calls(monkeypatch)
    main = threading.main_thread().ident
    real_save, plain_loss = fileio.atomic_torch_save, ImageClassifier._loss

    def loss(self, logits, labels):
        if self.training and self.trainer.global_step == 4 and not calls:
            signal.pthread_kill(main, signal.SIGINT)  # the first Ctrl-C, in epoch 1's second step
        return plain_loss(self, logits, labels)

    def save(obj: dict, target: Path) -> None:
        if obj["global_step"] == 5:  # the stop's checkpoint: the second Ctrl-C lands while it is written
            signal.pthread_kill(main, signal.SIGINT)
            wait_for(lambda: len(calls) >= 2, "the second Ctrl-C reached the handler")
        real_save(obj, target)

    monkeypatch.setattr(ImageClassifier, "_loss", loss)
    monkeypatch.setattr(reliability, "atomic_torch_save", save)
    code = cli.main(fit_args(tiny_folder, logs, "--max_epochs", "3", "--no_test"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 130 and calls == [signal.SIGINT, signal.SIGINT], (code, calls, err)
    assert err == [
        f"fit.py: stopped by SIGINT during training, checkpoint written; resume with: python scripts/fit.py "
        f"--ckpt_path {last}"
    ]
    assert load_checkpoint(last)["global_step"] == 5, "the checkpoint the line names is complete"


def test_a_second_ctrl_c_while_an_epoch_checkpoint_is_written_stops_once_it_is_complete_and_says_which(
    tiny_folder: Path, tmp_path: Path, monkeypatch, capsys
):
    logs = tmp_path / "logs"
    last = logs / "resnet20" / "version_0" / "checkpoints" / "last.ckpt"
    calls = _count_handler_calls(monkeypatch)
    main = threading.main_thread().ident
    real_save, plain_step = fileio.atomic_torch_save, ImageClassifier.training_step
    written: list[int] = []

    def save(obj: dict, target: Path) -> None:
        if target.name == "last.ckpt" and obj["global_step"] == 3:  # epoch 0's last.ckpt, written while epoch 1 trains
            for count in (1, 2):  # Ctrl-C twice, both while this file is being written
                signal.pthread_kill(main, signal.SIGINT)
                wait_for(lambda count=count: len(calls) >= count, f"Ctrl-C number {count} reached the handler")
        real_save(obj, target)
        written.append(obj["global_step"])

    def step(self, batch, batch_idx):
        if self.trainer.global_step == 3:  # epoch 1's first step runs until the held-back Ctrl-C is delivered again
            wait_for(lambda: len(calls) >= 3, "the held-back Ctrl-C is delivered once last.ckpt is complete")
        return plain_step(self, batch, batch_idx)

    monkeypatch.setattr(reliability, "atomic_torch_save", save)
    monkeypatch.setattr(ImageClassifier, "training_step", step)
    code = cli.main(fit_args(tiny_folder, logs, "--max_epochs", "3", "--no_test"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 130 and len(calls) == 3, (code, calls, err)
    assert err == [
        f"fit.py: stopped by SIGINT at once (a second Ctrl-C); no checkpoint written now, the latest complete one is "
        f"{last}; resume with: python scripts/fit.py --ckpt_path {last}"
    ]
    assert 3 in written and load_checkpoint(last)["global_step"] == 3


# ---------------------------------------------------------------------------------------------- Ctrl-C at start-up


CTRL_C_ON_IMPORT = """
import signal
import sys


class CtrlCWhenLightningLoads:
    def find_spec(self, name, path=None, target=None):
        if name == "lightning":
            sys.meta_path.remove(self)
            signal.raise_signal(signal.SIGINT)
        return None


sys.meta_path.insert(0, CtrlCWhenLightningLoads())
"""


@pytest.mark.slow
def test_ctrl_c_while_the_script_loads_is_one_line_and_exit_130(tiny_folder: Path, tmp_path: Path):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(CTRL_C_ON_IMPORT)
    env = {**script_env(tmp_path), "PYTHONPATH": os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, FIT, *fit_args(tiny_folder, tmp_path / "logs")], capture_output=True,
                          text=True, env=env, cwd=tmp_path, timeout=300)  # fmt: skip
    assert proc.returncode == 130, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == ["fit.py: stopped by SIGINT (Ctrl-C)"], proc.stderr[-2000:]
    assert not (tmp_path / "logs").exists()
