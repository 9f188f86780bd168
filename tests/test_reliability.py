"""Nothing lost: kills and resumes, atomic checkpoints, write failures, divergence, bad input, finished runs."""

from __future__ import annotations

import errno
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cifar_resnet import fileio
from cifar_resnet.cli import fit as cli
from cifar_resnet.training import reliability
from cifar_resnet.training.module import ImageClassifier
from cifar_resnet.training.reliability import AtomicCheckpointIO, CheckpointWriteError
from tests.conftest import make_image_folder
from tests.helpers import FIT, assert_same_training_state, fit, fit_args, load_checkpoint, poll_checkpoint, script_env

pytestmark = pytest.mark.reliability


# ---------------------------------------------------------------------------------------------- 1 and 2


@pytest.mark.slow
@pytest.mark.parametrize("workers", ["0", "2"])
def test_sigkill_after_an_epoch_then_resume_is_bitwise_identical(workers: str, tiny_folder: Path, tmp_path: Path):
    common = ("--max_epochs", "3", "--no_test", "--seed", "5", "--num_workers", workers)
    fit(*fit_args(tiny_folder, tmp_path / "whole", *common))
    whole = load_checkpoint(tmp_path / "whole" / "resnet20" / "version_0" / "checkpoints" / "last.ckpt")

    logs = tmp_path / "killed"
    last = logs / "resnet20" / "version_0" / "checkpoints" / "last.ckpt"
    proc = subprocess.Popen([sys.executable, FIT, *fit_args(tiny_folder, logs, *common)], env=script_env(tmp_path),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=tmp_path)  # fmt: skip
    try:
        killed_at = poll_checkpoint(last, proc, lambda c: c["epoch"] >= 0)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert load_checkpoint(last)["epoch"] < 2, "killed before the run finished"
    fit(*fit_args(tiny_folder, logs, *common, "--ckpt_path", str(last)))
    assert_same_training_state(load_checkpoint(last), whole)
    assert killed_at["callbacks"]["RNGState"]["torch"].dtype == torch.uint8, "RNG state travels in the checkpoint"


# ---------------------------------------------------------------------------------------------- 4


@pytest.mark.slow
@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_and_ctrl_c_save_print_how_to_resume_and_exit_non_zero(
    signum: int, code: int, tiny_folder: Path, tmp_path: Path
):
    logs = tmp_path / "logs"
    last = logs / "resnet20" / "version_0" / "checkpoints" / "last.ckpt"
    args = fit_args(tiny_folder, logs, "--max_epochs", "50", "--no_test", "--ckpt_every_n_steps", "2")
    proc = subprocess.Popen([sys.executable, FIT, *args], env=script_env(tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path)  # fmt: skip
    try:
        poll_checkpoint(last, proc, lambda c: c["global_step"] >= 2)
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == code, err
    assert "Traceback" not in err
    name = signal.Signals(signum).name
    # Epochs of 3 steps spend much of their time validating: Ctrl-C may land there, and also stops at once there.
    phases = ("during training", "during validation") if signum == signal.SIGINT else ("during training",)
    assert any(f"fit.py: stopped by {name} {phase}, checkpoint written; resume with: python scripts/fit.py "
               f"--ckpt_path {last}" in err for phase in phases), err  # fmt: skip
    saved = load_checkpoint(last)
    assert 2 <= saved["global_step"] < 150
    if signum == signal.SIGTERM:  # and it resumes: the run finishes its 50 epochs from there
        args[args.index("--max_epochs") + 1] = str(saved["epoch"] + 1)
        fit(*args, "--ckpt_path", str(last))
        assert load_checkpoint(last)["global_step"] == 3 * (saved["epoch"] + 1)


# ---------------------------------------------------------------------------------------------- 3


def test_atomic_checkpoint_io_keeps_the_previous_file_on_write_errors(tmp_path: Path, monkeypatch):
    io = AtomicCheckpointIO()
    target = tmp_path / "ckpts" / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 1}, target)

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(fileio.os, "fsync", full)
    with pytest.raises(CheckpointWriteError, match=r"No space left on device.*previous last\.ckpt, if any, is intact"):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "global_step": 2}, target)
    monkeypatch.undo()
    assert torch.equal(io.load_checkpoint(target)["state_dict"]["w"], torch.ones(3))
    assert [p.name for p in target.parent.iterdir()] == ["last.ckpt"], "the temp file is removed"

    target.parent.chmod(0o555)  # a read-only folder (root ignores permissions: then only ENOSPC is tested)
    try:
        if not os.access(target.parent, os.W_OK):
            with pytest.raises(CheckpointWriteError, match="Permission denied"):
                io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}}, target)
    finally:
        target.parent.chmod(0o755)
    assert torch.equal(io.load_checkpoint(target)["state_dict"]["w"], torch.ones(3))


def test_background_checkpoints_snapshot_the_state_and_delete_an_old_best_only_after_its_successor_is_written(
    tmp_path: Path, monkeypatch
):
    io = reliability.BackgroundCheckpointIO()
    old_best, new_best = tmp_path / "best-epoch000.ckpt", tmp_path / "best-epoch001.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}}, old_best)
    io.teardown()
    release = __import__("threading").Event()
    real_save = fileio.atomic_torch_save

    def slow_save(obj: object, target: Path) -> None:
        release.wait(10)
        real_save(obj, target)

    monkeypatch.setattr(reliability, "atomic_torch_save", slow_save)
    weights = torch.ones(3)
    io.save_checkpoint({"state_dict": {"w": weights}}, new_best)
    weights.add_(1)  # training goes on while the file is written: the checkpoint keeps the state at save time
    io.remove_checkpoint(old_best)
    time.sleep(0.2)
    assert old_best.is_file() and not new_best.exists(), "the old best stays until its successor is on disk"
    release.set()
    io.teardown()
    assert not old_best.exists()
    assert torch.equal(load_checkpoint(new_best)["state_dict"]["w"], torch.ones(3))


def test_disk_full_during_a_fit_exits_2_with_one_line_and_keeps_last(
    tiny_folder: Path, tmp_path: Path, monkeypatch, capsys
):
    logs = tmp_path / "logs"
    real_fsync, calls = os.fsync, []

    def fsync_fails_after_the_first_epoch(fd: int) -> None:
        if ".ckpt." in os.readlink(f"/proc/self/fd/{fd}"):  # checkpoint temp files only, not caches or folders
            calls.append(fd)
            if len(calls) > 2:  # epoch 0 writes best and last; every later write fails
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(fileio.os, "fsync", fsync_fails_after_the_first_epoch)
    code = cli.main(fit_args(tiny_folder, logs, "--max_epochs", "3", "--no_test"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("fit.py: error: could not write checkpoint "), err
    assert "No space left on device" in err[0]
    ckpt_dir = logs / "resnet20" / "version_0" / "checkpoints"
    assert load_checkpoint(ckpt_dir / "last.ckpt")["epoch"] == 0
    assert not list(ckpt_dir.glob(".*.tmp"))


# ---------------------------------------------------------------------------------------------- 5


def test_nan_losses_stop_the_run_naming_the_step_and_no_nan_checkpoint_is_written(
    tiny_folder: Path, tmp_path: Path, monkeypatch, capsys
):
    plain_loss = ImageClassifier._loss

    def poisoned(self, logits, labels):  # from training step 4 on (epoch 1, batch 1) the loss is NaN
        loss = plain_loss(self, logits, labels)
        return loss * float("nan") if self.training and self.trainer.global_step >= 4 else loss

    monkeypatch.setattr(ImageClassifier, "_loss", poisoned)
    logs = tmp_path / "logs"
    code = cli.main(fit_args(tiny_folder, logs, "--max_epochs", "3", "--no_test", "--max_nonfinite_steps", "2"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "training diverged: 2 consecutive non-finite losses from training step 4" in err[0]
    assert "lower --lr" in err[0]
    last = load_checkpoint(logs / "resnet20" / "version_0" / "checkpoints" / "last.ckpt")
    assert last["epoch"] == 0 and not reliability.non_finite_tensors(last["state_dict"])

    # With a patient limit the epoch-end save meets NaN weights: the checkpoint IO refuses them.
    logs = tmp_path / "patient"
    code = cli.main(fit_args(tiny_folder, logs, "--max_epochs", "3", "--no_test", "--max_nonfinite_steps", "50"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "weights are not finite" in err[0] and "lower --lr" in err[0], err
    last = load_checkpoint(logs / "resnet20" / "version_0" / "checkpoints" / "last.ckpt")
    assert last["epoch"] == 0 and not reliability.non_finite_tensors(last["state_dict"])


# ---------------------------------------------------------------------------------------------- 6


def test_config_drift_and_finished_runs(tiny_folder: Path, tmp_path: Path, capsys):
    logs = tmp_path / "logs"
    fit(*fit_args(tiny_folder, logs, "--max_epochs", "1", "--no_test"))
    last = logs / "resnet20" / "version_0" / "checkpoints" / "last.ckpt"
    before = sorted((p.name, p.stat().st_mtime_ns) for p in last.parent.iterdir())
    capsys.readouterr()

    assert cli.main(fit_args(tiny_folder, logs, "--max_epochs", "1", "--ckpt_path", str(last))) == 0
    out = capsys.readouterr().out
    assert "the run is finished: 1 epoch trained of --max_epochs 1; nothing to do" in out
    assert sorted((p.name, p.stat().st_mtime_ns) for p in last.parent.iterdir()) == before

    four_classes = make_image_folder(tmp_path / "four", classes=4)
    assert cli.main(fit_args(four_classes, logs, "--max_epochs", "2", "--ckpt_path", str(last))) == 2
    assert "has 3 classes but" in capsys.readouterr().err

    # A longer --max_epochs extends the run: training continues from the next epoch.
    fit(*fit_args(tiny_folder, logs, "--max_epochs", "2", "--no_test", "--ckpt_path", str(last)))
    assert (load_checkpoint(last)["epoch"], load_checkpoint(last)["global_step"]) == (1, 6)


# ---------------------------------------------------------------------------------------------- 7


def _bad_inputs(tmp_path: Path, data: Path, ckpt: Path) -> list[tuple[list[str], str]]:
    """(extra arguments, expected message fragment); each replaces a flag of fit_args or adds one."""
    missing = tmp_path / "nowhere"
    empty = tmp_path / "empty"
    empty.mkdir()
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    (wrong / "notes.txt").write_text("hello")
    corrupt = make_image_folder(tmp_path / "corrupt")
    (corrupt / "train" / "class_0" / "0000.png").write_bytes(b"not a png")
    notimage = make_image_folder(tmp_path / "notimage")
    (notimage / "train" / "class_1" / "x.jpg").write_text("plain text")
    cifar = tmp_path / "cifar" / "cifar-10-batches-py"
    cifar.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (cifar / name).write_bytes(b"\x80\x04truncated")
    (cifar / "batches.meta").write_bytes(pickle.dumps({"label_names": ["a"] * 10}))
    text = tmp_path / "text.ckpt"
    text.write_text("not a checkpoint")
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": np.random.default_rng(0)}, evil)  # needs unpickling code
    noise = tmp_path / "noise.ckpt"
    noise.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"\x08\x07\x12\x07pytorch" + noise.read_bytes()[:512])
    wrong_type = tmp_path / "wrong_type.yaml"
    wrong_type.write_text("weight_decay: fast\n")  # (--lr is on the command line)
    loop = make_image_folder(tmp_path / "class_loop")
    (loop / "train" / "class_3").symlink_to(loop / "train" / "class_3")
    dangling = make_image_folder(tmp_path / "class_dangling")
    (dangling / "test" / "class_3").symlink_to(tmp_path / "gone")
    return [
        (["--arch", "resnet9000"], "--arch must be one of resnet18, resnet34, "),
        (["--max_epochs", "0"], "--max_epochs must be a positive integer, got 0"),
        (["--max_epochs", "-3"], "--max_epochs must be a positive integer, got -3"),
        (["--batch_size", "0"], "--batch_size must be a positive integer, got 0"),
        (["--lr", "-0.1"], "--lr must be a positive number, got -0.1"),
        (["--lr", "0"], "--lr must be a positive number, got 0"),
        (["--data_dir", str(missing)], f"--data_dir {missing} does not exist"),
        (["--data_dir", str(empty)], f"--data_dir {empty} is empty"),
        (["--data_dir", str(wrong)], f"--data_dir {wrong} holds neither train/<class>/<image> nor CIFAR-10 files"),
        (["--data_dir", str(corrupt)], f"cannot decode image {corrupt}/train/class_0/0000.png"),
        (["--data_dir", str(notimage)], f"cannot decode image {notimage}/train/class_1/x.jpg"),
        (["--data_dir", str(cifar.parent)], f"CIFAR-10 files in {cifar} are unreadable"),
        (["--ckpt_path", str(missing)], f"--ckpt_path {missing}: no such file"),
        (["--ckpt_path", str(text)], f"--ckpt_path {text} is not a loadable checkpoint"),
        (["--ckpt_path", str(truncated)], f"--ckpt_path {truncated} is not a loadable checkpoint"),
        (["--ckpt_path", str(evil)], f"--ckpt_path {evil} is not a loadable checkpoint"),
        (["--arch", "resnet32", "--ckpt_path", str(ckpt)], "would change what it learns: --arch resnet32 (the run's"),
        (["--accelerator", "gpu"], "cannot run on this machine"),
        (["--accelerator", "cpu", "--devices", "512"], "--devices 512 on the CPU, but this machine has"),
        (["--devices", "0"], "--devices must be auto, a positive count, -1, or a list of device ids, got 0"),
        (["--ckpt_path", str(noise)], f"--ckpt_path {noise} is not a loadable checkpoint (not a zip archive as"),
        (["--ckpt_path", str(onnx)], f"--ckpt_path {onnx} is not a loadable checkpoint (an ONNX model, which"),
        (
            ["--config", str(wrong_type)],
            f"--weight_decay must be 0 or a positive number, got 'fast' (in --config {wrong_type})",
        ),
        (["--seed", "-5"], "--seed must be an integer from 0 to 4294967295, got -5"),
        (["--seed", "4294967296"], "--seed must be an integer from 0 to 4294967295, got 4294967296"),
        (["--cutout", "100"], "--cutout must be an integer from 0 to 31 (below the 32-pixel image side"),
        (["--crop_padding", "100"], "--crop_padding must be an integer from 0 to 31 (below the 32-pixel image side"),
        (["--data_dir", str(loop)], f"class folder {loop}/train/class_3 is a symbolic link loop"),
        (["--data_dir", str(dangling)], f"class folder {dangling}/test/class_3 is a broken symbolic link (to "),
    ]


def _with(base: list[str], extra: list[str]) -> list[str]:
    args = list(base)
    for flag, value in zip(extra[::2], extra[1::2], strict=True):
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    return args


def test_every_bad_input_is_one_line_exit_2_and_writes_nothing(tiny_folder: Path, tmp_path: Path, capsys):
    logs = tmp_path / "logs"
    fit(*fit_args(tiny_folder, logs, "--max_epochs", "1", "--no_test"))
    ckpt = logs / "resnet20" / "version_0" / "checkpoints" / "last.ckpt"
    before = sorted((str(p), p.stat().st_mtime_ns) for p in logs.rglob("*") if p.is_file())
    paths_before = sorted(logs.rglob("*"))
    capsys.readouterr()
    base = fit_args(tiny_folder, logs, "--max_epochs", "2", "--no_test")
    cases = _bad_inputs(tmp_path, tiny_folder, ckpt)
    failures = []
    for extra, expected in cases:
        try:
            code = cli.main(_with(base, extra))
        except SystemExit as stop:  # argparse errors
            code = stop.code
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        advice = any("weights_only" in line for line in err)  # torch's advice to load code from the file
        if code != 2 or len(err) != 1 or not err[0].startswith("fit.py: error: ") or expected not in err[0] or advice:
            failures.append((extra, code, err))
    assert not failures, failures
    assert sorted((p, os.stat(p).st_mtime_ns) for p, _ in before) == before, "nothing overwritten"
    assert sorted(logs.rglob("*")) == paths_before, "no file or folder added (a corrupt image included)"

    # Through the real script: one line, exit 2, no traceback.
    for extra, expected in (cases[9], cases[15]):  # a corrupt image, a pickle payload
        proc = subprocess.run([sys.executable, FIT, *_with(base, extra)], capture_output=True, text=True,
                              env=script_env(tmp_path), cwd=tmp_path, timeout=120)  # fmt: skip
        lines = [line for line in proc.stderr.splitlines() if line.startswith("fit.py")]  # not Lightning's info
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert len(lines) == 1 and expected in lines[0], proc.stderr


def test_a_log_dir_that_cannot_be_written_is_one_line(tiny_folder: Path, tmp_path: Path, capsys, monkeypatch):
    logs = tmp_path / "logs"
    real_mkdir = Path.mkdir

    def refused(self: Path, *args, **kwargs) -> None:  # as a folder without write permission answers (EACCES)
        if self == logs or logs in self.parents:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", refused)
    assert cli.main(fit_args(tiny_folder, logs, "--max_epochs", "1")) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    refused_at = logs / "resnet20"
    assert err == [f"fit.py: error: --log_dir {logs}: cannot create the run folder (Permission denied: {refused_at}); "
                   "pass a --log_dir you can write to"]  # fmt: skip
    assert not logs.exists()


# ---------------------------------------------------------------------------------------------- 8


PREPARE_TRACER = """
import os

from cifar_resnet.data import datamodule

_prepare = datamodule.CIFARDataModule.prepare_data


def _traced(self):
    with open(os.environ["PREPARE_TRACE"], "a") as f:
        f.write(f"pid {os.getpid()} local_rank {os.environ.get('LOCAL_RANK', '0')}\\n")
    return _prepare(self)


datamodule.CIFARDataModule.prepare_data = _traced
with open(os.environ["PREPARE_TRACE"], "a") as f:
    f.write(f"loaded {os.getpid()}\\n")
"""


@pytest.mark.slow
def test_two_process_ddp_trains_validates_like_one_process_and_resumes_on_one(
    tiny_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    import lightning as L

    from cifar_resnet.data import CIFARDataModule

    logs = tmp_path / "logs"
    args = fit_args(tiny_folder, logs, "--max_epochs", "1", "--no_test", "--eval_batch_size", "4")
    ddp = [*args, "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp"]
    # Every process of the run records its prepare_data calls (sitecustomize loads in each interpreter).
    trace_dir, trace = tmp_path / "trace", tmp_path / "prepare_calls.txt"
    trace_dir.mkdir()
    (trace_dir / "sitecustomize.py").write_text(PREPARE_TRACER)
    pythonpath = os.pathsep.join(p for p in (str(trace_dir), os.environ.get("PYTHONPATH", "")) if p)
    env = {**script_env(tmp_path), "OMP_NUM_THREADS": "1", "PYTHONPATH": pythonpath, "PREPARE_TRACE": str(trace)}
    proc = subprocess.run([sys.executable, FIT, *ddp], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=180)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = trace.read_text().splitlines()
    calls = [line for line in lines if line.startswith("pid ")]
    assert len({line for line in lines if line.startswith("loaded ")}) >= 2, "the tracer ran in both processes"
    assert len(calls) == 1, f"prepare_data must run once per node, ran {calls}"
    last = logs / "resnet20" / "version_0" / "checkpoints" / "last.ckpt"
    ckpt = load_checkpoint(last)
    ddp_acc = next(v["best_model_score"] for k, v in ckpt["callbacks"].items() if "val/acc" in k)

    # The same weights evaluated by one process: every validation image counted once either way.
    model = ImageClassifier(**ckpt["hyper_parameters"])
    model.load_state_dict(ckpt["state_dict"])
    data = CIFARDataModule(str(tiny_folder), batch_size=8, eval_batch_size=4, val_size=6, seed=0)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    single = trainer.validate(model, datamodule=data, verbose=False)[0]["val/acc"]
    assert float(single) == pytest.approx(float(ddp_acc), abs=1e-6)

    # The DDP checkpoint resumes on one process when asked to (2 processes x 1 step an epoch, then 3 steps an
    # epoch); without --devices and --strategy it would continue as it was started, on two.
    args[args.index("--max_epochs") + 1] = "2"
    capsys.readouterr()
    fit(*args, "--ckpt_path", str(last), "--devices", "1", "--strategy", "auto")
    resumed = load_checkpoint(last)
    assert (resumed["epoch"], resumed["global_step"]) == (1, ckpt["global_step"] + 3)
    assert "continuing on 1 process (was 2): global batch 8 (was 16) per step" in capsys.readouterr().out
    assert {g["lr"] for g in resumed["optimizer_states"][0]["param_groups"]} == {0.0}, "the schedule ends at its end"

    # And the reverse: that one-process checkpoint continues under DDP (1 step an epoch per process).
    args[args.index("--max_epochs") + 1] = "3"
    ddp_again = [*args, "--ckpt_path", str(last), "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp"]
    proc = subprocess.run([sys.executable, FIT, *ddp_again], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=180)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    again = load_checkpoint(last)
    assert (again["epoch"], again["global_step"]) == (2, resumed["global_step"] + 1)
    assert "continuing on 2 processes (was 1): global batch 16 (was 8) per step" in proc.stdout
    assert {g["lr"] for g in again["optimizer_states"][0]["param_groups"]} == {0.0}
