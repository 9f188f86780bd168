"""Runs that cannot be confused: resume from the checkpoint alone, refused changes, data identity, exclusive
folders, exact mid-epoch resume, signals in every phase and one-line mistakes, through the real scripts."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
from PIL import Image

from cifar_resnet.cli import fit as cli
from tests.conftest import make_image_folder
from tests.helpers import (
    EXPORT,
    FIT,
    TEST,
    end,
    files_of,
    fit,
    fit_args,
    held_run_env,
    load_checkpoint,
    one_error_line,
    poll_checkpoint,
    processes_marked,
    run_script,
    scalars,
    script_env,
    stop_mid_epoch_and_resume,
    training_state,
    wait_for_file,
    wait_until_gone,
    with_path,
)

pytestmark = pytest.mark.reliability


@pytest.fixture
def data(tmp_path: Path) -> Path:
    """3 classes x 16 training images: 42 after a 6-image validation split, 5 batches of 8 an epoch."""
    return make_image_folder(tmp_path / "data", per_class={"train": 16, "test": 4})


# ---------------------------------------------------------------------------------------------- 1


def test_the_checkpoint_alone_continues_the_run_from_any_directory(data: Path, tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    args = fit_args(data, logs, "--max_epochs", "3", "--limit_train_batches", "2", "--ckpt_every_n_steps", "1")
    proc = subprocess.Popen([sys.executable, FIT, *args], env=script_env(tmp_path), cwd=tmp_path, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    last = logs / "resnet20" / "version_0" / "checkpoints" / "last.ckpt"
    try:
        poll_checkpoint(last, proc, lambda c: c["global_step"] >= 3)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        end(proc)
    assert proc.returncode == 143
    resume_line = next(line for line in err.splitlines() if "resume with: " in line).split("resume with: ")[1]
    assert resume_line == f"python scripts/fit.py --ckpt_path {last}", "complete: the checkpoint carries the rest"

    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "scripts").mkdir(parents=True)
    (elsewhere / "scripts" / "fit.py").symlink_to(FIT)  # the printed command, run from another folder
    command = shlex.split(resume_line)
    command[0] = sys.executable
    done = subprocess.run(command, cwd=elsewhere, env=script_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"resuming {last} (epoch" in done.stdout
    final = load_checkpoint(last)
    assert (final["epoch"], final["global_step"]) == (2, 6), "3 epochs of 2 batches: --limit_train_batches kept"
    assert final["run_config"]["data_dir"] == str(data.resolve()), "the image folder, not ./data"
    assert not (elsewhere / "data").exists() and not (elsewhere / "lightning_logs").exists()


def test_options_that_change_what_is_learned_are_refused_and_free_ones_are_announced(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    logs = tmp_path / "logs"
    fit(*fit_args(data, logs, "--max_epochs", "1", "--no_test"))
    last = logs / "resnet20" / "version_0" / "checkpoints" / "last.ckpt"
    before = files_of(logs)
    capsys.readouterr()
    refused = [("--seed", "3"), ("--lr", "0.2"), ("--batch_size", "4"), ("--val_size", "9"), ("--arch", "resnet32"),
               ("--weight_decay", "0.0"), ("--no_hflip",), ("--cutout", "8"), ("--schedule", "multistep")]  # fmt: skip
    for flag in refused:
        assert cli.main(["--ckpt_path", str(last), "--max_epochs", "2", *flag]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"would change what it learns: {' '.join(flag)} (the run's: --" in err[0], (flag, err)
        assert "Drop them to resume, or start a new run without --ckpt_path" in err[0]
    assert files_of(logs) == before, "a refused resume changes nothing"

    # Several at once are named together; the same value as the run's is no change at all.
    assert cli.main(["--ckpt_path", str(last), "--max_epochs", "2", "--lr", "0.3", "--seed", "1"]) == 2
    err = capsys.readouterr().err
    assert "--lr 0.3 (the run's: --lr 0.05); --seed 1 (the run's: --seed 0)" in err
    assert cli.main(["--ckpt_path", str(last), "--max_epochs", "2", "--lr", "0.05", "--num_workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "changed: --max_epochs 2 (was --max_epochs 1), --num_workers 1 (was --num_workers 0)" in out
    assert load_checkpoint(last)["run_config"]["max_epochs"] == 2, "the checkpoint carries the run as it now is"


def test_ckpt_path_auto_starts_a_run_once_then_continues_it(data: Path, tmp_path: Path, capsys) -> None:
    logs = tmp_path / "logs"
    batch_script = fit_args(data, logs, "--max_epochs", "1", "--no_test", "--ckpt_path", "auto")
    assert cli.main(batch_script) == 0  # nothing to resume yet: a new run
    assert "no last.ckpt under" in capsys.readouterr().out
    batch_script[batch_script.index("--max_epochs") + 1] = "2"
    assert cli.main(batch_script) == 0  # requeued with the same command: it continues
    assert sorted(p.name for p in (logs / "resnet20").iterdir()) == ["version_0"]
    assert load_checkpoint(logs / "resnet20" / "version_0" / "checkpoints" / "last.ckpt")["epoch"] == 1


# ---------------------------------------------------------------------------------------------- 2


def test_other_data_is_refused_by_fit_and_by_test(data: Path, tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    fit(*fit_args(data, logs, "--max_epochs", "1", "--no_test"))
    last = logs / "resnet20" / "version_0" / "checkpoints" / "last.ckpt"
    renamed = tmp_path / "renamed"
    shutil.copytree(data, renamed)
    for split in ("train", "test"):
        (renamed / split / "class_1").rename(renamed / split / "class_9")
    before = files_of(logs)
    line = one_error_line(run_script(FIT, "--ckpt_path", str(last), "--data_dir", str(renamed), "--max_epochs", "2",
                                tmp_path=tmp_path))  # fmt: skip
    assert "has the classes class_0, class_2, class_9, but the run was trained on class_0, class_1, class_2" in line
    line = one_error_line(run_script(TEST, "--ckpt_path", str(last), "--data_dir", str(renamed), tmp_path=tmp_path),
                           "test.py")  # fmt: skip
    assert "was trained on class_0, class_1, class_2: its outputs would be read as the wrong classes" in line

    shuffled = tmp_path / "shuffled"  # same class names, other images
    shutil.copytree(data, shuffled)
    one = shuffled / "train" / "class_0" / "0000.png"
    Image.new("RGB", (32, 32), (1, 2, 3)).save(one)
    line = one_error_line(run_script(FIT, "--ckpt_path", str(last), "--data_dir", str(shuffled), "--max_epochs", "2",
                                tmp_path=tmp_path))  # fmt: skip
    assert "holds other images than the run was trained on" in line
    assert files_of(logs) == before

    moved = tmp_path / "moved"  # the same data in another place resumes
    shutil.copytree(data, moved)
    fit(*fit_args(moved, logs, "--max_epochs", "2", "--no_test", "--ckpt_path", str(last)))
    assert load_checkpoint(last)["epoch"] == 1


# ---------------------------------------------------------------------------------------------- 3


def test_fits_started_together_get_their_own_folders(data: Path, tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    procs = [subprocess.Popen([sys.executable, FIT, *fit_args(data, logs, "--max_epochs", "1", "--no_test",
                                                              "--seed", str(seed))],
                              env=script_env(tmp_path), cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True) for seed in (1, 2)]  # fmt: skip
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
    folders = sorted((logs / "resnet20").iterdir())
    assert [f.name for f in folders] == ["version_0", "version_1"]
    seeds = sorted(load_checkpoint(f / "checkpoints" / "last.ckpt")["run_config"]["seed"] for f in folders)
    assert seeds == [1, 2], "each folder holds one run's checkpoints"
    assert not any((f / ".lock").exists() for f in folders), "locks are released"


def test_a_run_in_progress_cannot_be_resumed_twice_and_a_killed_runs_lock_is_taken_over(
    data: Path, tmp_path: Path
) -> None:
    logs = tmp_path / "logs"
    args = fit_args(data, logs, "--max_epochs", "50", "--no_test", "--ckpt_every_n_steps", "1")
    proc = subprocess.Popen([sys.executable, FIT, *args], env=script_env(tmp_path), cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    folder = logs / "resnet20" / "version_0"
    try:
        poll_checkpoint(folder / "checkpoints" / "last.ckpt", proc, lambda c: c["global_step"] >= 2)
        holder = json.loads((folder / ".lock").read_text())
        assert holder["pid"] == proc.pid
        second = run_script(FIT, "--ckpt_path", "last", "--log_dir", str(logs), "--max_epochs", "60", tmp_path=tmp_path)
        line = one_error_line(second)
        assert f"run folder {folder} is in use by process {proc.pid}" in line
    finally:
        proc.send_signal(signal.SIGKILL)
        end(proc)
    assert (folder / ".lock").exists(), "SIGKILL leaves the lock behind"
    one_more = str(load_checkpoint(folder / "checkpoints" / "last.ckpt")["epoch"] + 2)
    resumed = run_script(
        FIT, "--ckpt_path", "last", "--log_dir", str(logs), "--max_epochs", one_more, tmp_path=tmp_path
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"took over a stale lock of process {proc.pid}" in resumed.stdout
    assert not (folder / ".lock").exists()


def test_a_moved_run_folder_resumes_with_its_best_record(data: Path, tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    fit(*fit_args(data, logs, "--max_epochs", "2", "--no_test"))
    moved = tmp_path / "archive" / "run"
    moved.parent.mkdir(parents=True)
    shutil.move(str(logs / "resnet20" / "version_0"), str(moved))
    last = moved / "checkpoints" / "last.ckpt"
    best_before = next(v for k, v in load_checkpoint(last)["callbacks"].items() if "'val/acc'" in k)["best_model_score"]
    result = fit(*fit_args(data, logs, "--max_epochs", "3", "--no_test", "--ckpt_path", str(last)))
    assert result["run_dir"] == str(moved)
    assert result["curves"] == f"tensorboard --logdir {moved.parent.parent}", (
        "the curves of the moved run, not the original"
    )
    assert result["best_val_acc"] >= float(best_before), "the record survived the move"
    assert len(list((moved / "checkpoints").glob("best-*.ckpt"))) == 1


# ---------------------------------------------------------------------------------------------- 4 and 5


@pytest.mark.slow
@pytest.mark.parametrize(("workers", "signum"), [("0", signal.SIGKILL), ("2", signal.SIGKILL), ("0", signal.SIGTERM)])
def test_a_run_stopped_mid_epoch_and_resumed_ends_bitwise_as_an_uninterrupted_one(
    workers: str, signum: int, data: Path, tmp_path: Path
) -> None:
    common = ("--max_epochs", "2", "--no_test", "--seed", "4", "--num_workers", workers, "--ckpt_every_n_steps", "1")
    fit(*fit_args(data, tmp_path / "whole", *common))
    whole_dir = tmp_path / "whole" / "resnet20" / "version_0"

    last, stopped_at = stop_mid_epoch_and_resume(data, tmp_path, common, signum, [1, 2, 3, 6, 7, 8])

    a, b = training_state(whole_dir / "checkpoints" / "last.ckpt"), training_state(last)
    assert a["step"] == b["step"] == 10 and a["lr"] == b["lr"]
    different = [k for k in a["weights"] if not torch.equal(a["weights"][k], b["weights"][k])]
    assert different == [], f"stopped at step {stopped_at}: {different[:3]}"
    assert all(torch.equal(x, y) for x, y in zip(a["momentum"], b["momentum"], strict=True))
    # The epoch that was interrupted reports the same training figures as the uninterrupted one.
    for tag in ("train/loss", "train/acc"):
        assert dict(scalars(last.parent.parent)[tag]) == pytest.approx(dict(scalars(whole_dir)[tag]))


def test_figures_after_a_resume_are_finite_and_timed_from_the_resume(data: Path, tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    common = ("--max_epochs", "2", "--no_test", "--ckpt_every_n_steps", "1", "--progress", "lines")
    env, _ = held_run_env(tmp_path, at_step=3)  # step 2's checkpoint is the run's last: it cannot finish first
    proc = subprocess.Popen([sys.executable, FIT, *fit_args(data, logs, *common)], env=env, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    last = logs / "resnet20" / "version_0" / "checkpoints" / "last.ckpt"
    try:
        poll_checkpoint(last, proc, lambda c: c["global_step"] >= 2)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        end(proc)
    assert load_checkpoint(last)["global_step"] == 2
    started = time.monotonic()
    resumed = run_script(FIT, *fit_args(data, logs, *common, "--ckpt_path", str(last)), tmp_path=tmp_path)
    took = time.monotonic() - started
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    epoch_line = next(line for line in resumed.stdout.splitlines() if line.startswith("epoch 1 done in "))
    seconds = float(epoch_line.split("done in ")[1].split("s")[0])
    assert 0 < seconds < took and "(resumed at batch" in epoch_line, epoch_line
    for tag, points in scalars(logs / "resnet20" / "version_0").items():
        assert all(torch.isfinite(torch.tensor(v)) for _, v in points), tag
    rates = [v for _, v in scalars(logs / "resnet20" / "version_0")["train/images_per_sec"]]
    assert all(rate > 1 for rate in rates), rates


@pytest.mark.slow
def test_a_run_killed_hard_leaves_no_loader_worker_behind(tmp_path: Path) -> None:
    # Batches of 32 images (98 KB each) fill the workers' pipe while the run is held: a worker of a dead run then
    # blocks on its way out unless it is ended with its parent.
    data = make_image_folder(tmp_path / "data", per_class={"train": 60, "test": 2})
    env, held = held_run_env(tmp_path, at_step=1)
    mark = uuid.uuid4().hex
    env["CIFAR_RESNET_TEST_RUN"] = mark  # inherited by the loader workers, also once re-parented
    args = fit_args(data, tmp_path / "logs", "--max_epochs", "2", "--no_test", "--num_workers", "2", "--batch_size",
                    "32")  # fmt: skip
    proc = subprocess.Popen([sys.executable, FIT, *args], env=env, cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)  # fmt: skip
    try:
        wait_for_file(held, proc)
        workers = [pid for pid, _ in processes_marked("CIFAR_RESNET_TEST_RUN", mark) if pid != proc.pid]
        assert len(workers) >= 2, "the training loader's workers run"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        left = wait_until_gone("CIFAR_RESNET_TEST_RUN", mark, timeout=60)
        assert left == [], f"still alive after the run was killed: {left}"
    finally:
        end(proc)
        for pid, _ in processes_marked("CIFAR_RESNET_TEST_RUN", mark):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


# ---------------------------------------------------------------------------------------------- 6

PAUSE_HOOK = """
import os, time
from pathlib import Path

_where, _marker, _at = os.environ["PAUSE_IN"], Path(os.environ["PAUSE_MARKER"]), int(os.environ["PAUSE_AT"])
_calls = [0]


def _pausing(function):
    def paused(*args, **kwargs):
        _calls[0] += 1
        if _calls[0] == _at:
            _marker.write_text("here")
            # The test signals now, then writes the "sent" file: wait for that state (the signal's handler has run by
            # then, in this loop); the deadline only guards against a hang.
            sent, deadline = _marker.with_name("sent"), time.monotonic() + 120
            while not sent.exists() and time.monotonic() < deadline:
                time.sleep(0.01)
        return function(*args, **kwargs)
    return paused


if _where == "decoding":
    from cifar_resnet.data import sources
    sources.load_image_folder = _pausing(sources.load_image_folder)
else:
    from cifar_resnet.training import module
    name = {"validation": "validation_step", "test": "test_step"}[_where]
    setattr(module.ImageClassifier, name, _pausing(getattr(module.ImageClassifier, name)))
"""


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["decoding", "validation", "last validation", "test"])
@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_in_any_phase_exits_non_zero_with_one_line(
    phase: str, signum: int, code: int, data: Path, tmp_path: Path
) -> None:
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(PAUSE_HOOK)
    marker = tmp_path / "paused"
    # Validation steps: the sanity check is call 1, the first epoch's validation call 2.
    where, at = {"decoding": ("decoding", 1), "validation": ("validation", 2), "last validation": ("validation", 2),
                 "test": ("test", 1)}[phase]  # fmt: skip
    env = script_env(tmp_path)
    env.update(
        PYTHONPATH=with_path(str(hook), env["PYTHONPATH"]), PAUSE_MARKER=str(marker), PAUSE_IN=where, PAUSE_AT=str(at)
    )
    logs = tmp_path / "logs"
    epochs = "1" if phase in ("last validation", "test") else "3"
    args = fit_args(data, logs, "--max_epochs", epochs, *(() if phase == "test" else ("--no_test",)))
    proc = subprocess.Popen([sys.executable, FIT, *args], env=env, cwd=tmp_path, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(signum)
        (marker.parent / "sent").write_text("sent")
        _, err = proc.communicate(timeout=120)
    finally:
        end(proc)
    assert proc.returncode == code, err[-2000:]
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("fit.py")]
    name = signal.Signals(signum).name
    assert len(lines) == 1 and lines[0].startswith(f"fit.py: stopped by {name}"), err
    last = logs / "resnet20" / "version_0" / "checkpoints" / "last.ckpt"
    if phase == "decoding":
        assert "nothing was trained, nothing to resume" in lines[0]
        assert not (logs / "resnet20" / "version_0").exists(), "no empty run folder left"
    elif phase == "test":
        assert (
            f"training is complete ({last}); run the final test and write the run's record with: python "
            f"scripts/fit.py --ckpt_path {last}" in lines[0]
        )
    else:
        assert last.is_file() and (f"resume with: python scripts/fit.py --ckpt_path {last}" in lines[0]
                                   or "training is complete" in lines[0]), lines  # fmt: skip
    if phase in ("last validation", "test"):
        # The stopped validation or test runs again on resume, and the run ends with its record.
        resumed = run_script(FIT, "--ckpt_path", str(last), tmp_path=tmp_path)
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        record = json.loads((logs / "resnet20" / "version_0" / "result.json").read_text())
        assert record["best_epoch"] == 1 and record["best_val_acc"] is not None
        assert (record["test_acc"] is not None) == (phase == "test")


# ---------------------------------------------------------------------------------------------- 7


@pytest.mark.slow
def test_more_mistakes_are_one_line_exit_2_and_change_nothing(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from cifar_resnet.cli import export as export_cli
    from cifar_resnet.cli import test as test_cli

    logs = tmp_path / "logs"
    fit(*fit_args(data, logs, "--max_epochs", "1"))
    run = logs / "resnet20" / "version_0"
    last = run / "checkpoints" / "last.ckpt"
    exported = tmp_path / "weights.pth"
    assert export_cli.main(["--ckpt_path", str(last), "--format", "state_dict", "--out", str(exported)]) == 0
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    before = files_of(tmp_path)
    base = fit_args(data, logs, "--max_epochs", "1")
    cases = [
        (FIT, [*base, "--label_smoothing", "2"], "--label_smoothing must be at least 0 and below 1, got 2.0"),
        (FIT, [*base, "--limit_train_batches", "0.1"], "--limit_train_batches 0.1 of 5 training batches leaves none"),
        (FIT, [*base, "--batch_size", "64"], "--batch_size 64 is larger than the training split (42 images)"),
        (FIT, [*base, "--accelerator", "cpu", "--devices", "0,1"], "--devices 0,1 names GPUs, but this run is on"),
        (FIT, [*base, "--log_dir", str(a_file)], f"--log_dir {a_file} is a file"),
        (FIT, [*base, "--ckpt_path", str(exported)], "holds weights but no training state (a file of export.py?)"),
        (TEST, ["--ckpt_path", str(last), "--out", str(a_file)], f"--out {a_file} is a file"),
        (TEST, ["--ckpt_path", str(exported)], "has no arch/num_classes hyperparameters"),
        (EXPORT, ["--ckpt_path", str(last), "--format", "onnx", "--out", str(tmp_path)], "is a directory"),
        (EXPORT, ["--ckpt_path", str(last), "--format", "state_dict", "--out", str(last)], "is the checkpoint itself"),
        (EXPORT, ["--ckpt_path", str(last), "--format", "state_dict", "--out", str(exported)], "pass --overwrite"),
    ]
    mains = {FIT: cli.main, TEST: test_cli.main, EXPORT: export_cli.main}
    for script, args, expected in cases:  # each script's main(), as the script runs it
        assert mains[script](args) == 2, args
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(err) == 1 and err[0].startswith(f"{Path(script).name}: error: ") and expected in err[0], (args, err)
    for script, args, expected in (cases[2], cases[6]):  # and through the real scripts: one line, no traceback
        assert expected in one_error_line(run_script(script, *args, tmp_path=tmp_path), Path(script).name)
    assert files_of(tmp_path) == before, "nothing written, nothing replaced, no empty run folder"

    # A report or plots written before are kept unless --overwrite says otherwise.
    from cifar_resnet.cli import benchmark as benchmark_cli
    from cifar_resnet.cli import plot as plot_cli

    assert test_cli.main(["--ckpt_path", str(last)]) == 0
    assert test_cli.main(["--ckpt_path", str(last)]) == 2
    assert "already holds a report (metrics.json, ...); pass --overwrite" in capsys.readouterr().err
    assert test_cli.main(["--ckpt_path", str(last), "--overwrite"]) == 0
    assert plot_cli.main([str(run)]) == 0
    assert plot_cli.main([str(run)]) == 2
    assert "pass --overwrite to replace the plots" in capsys.readouterr().err

    # The benchmark never downloads CIFAR-10 into a mistyped folder.
    assert benchmark_cli.main(["--device", "cpu", "--data_dir", str(tmp_path / "dta")]) == 2
    assert f"--data_dir {tmp_path / 'dta'} does not exist" in capsys.readouterr().err
    assert not (tmp_path / "dta").exists()


# ---------------------------------------------------------------------------------------------- 8


def test_a_validation_limit_samples_every_class(tmp_path: Path) -> None:
    folder = make_image_folder(tmp_path / "data", classes=5, per_class={"train": 20})
    from cifar_resnet import CIFARDataModule

    data = CIFARDataModule(str(folder), val_size=25, batch_size=8, eval_batch_size=5, cache_dir=str(tmp_path / "c"))
    data.setup("fit")
    first_batch = next(iter(data.val_dataloader()))[1]
    assert sorted(first_batch.tolist()) == [0, 1, 2, 3, 4], "one batch of five: one image of each class"


def test_a_lock_from_another_host_or_a_live_process_is_respected(tmp_path: Path) -> None:
    from cifar_resnet.errors import UserError
    from cifar_resnet.training.runs import run_lock

    folder = tmp_path / "run"
    folder.mkdir()
    (folder / ".lock").write_text(json.dumps({"pid": os.getpid(), "host": "elsewhere", "started": "earlier"}))
    with pytest.raises(UserError, match=r"in use by process .* on elsewhere"), run_lock(folder):
        pass
    (folder / ".lock").write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname(), "started": "x"}))
    with pytest.raises(UserError, match=f"in use by process {os.getppid()}"), run_lock(folder):
        pass
