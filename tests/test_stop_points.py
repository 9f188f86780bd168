"""A stop at any point of a fit changes nothing: stopped there, resumed, a run ends as the uninterrupted one.

The stop is a real signal sent to this process from a hook (training batches, validation batches, checkpoint
writes, the final test), so the project's own handlers act on it exactly as on a user's Ctrl-C or a scheduler's
SIGTERM. Every stopped run is resumed from its ``last.ckpt`` and compared with one shared uninterrupted run:
weights and averaged weights, the per-epoch validation curve, the best checkpoint and ``result.json``.
"""

from __future__ import annotations

import json
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

from cifar_resnet.cli import fit as cli
from cifar_resnet.training.reliability import TrainingInterruptedError
from tests.conftest import make_image_folder
from tests.helpers import files_of, fit, fit_args, load_checkpoint, scalars

pytestmark = pytest.mark.reliability

# 3 classes x 12 training images: 30 after a 6-image validation split, 3 steps of 8 an epoch; 3 validation
# batches and 6 test batches of 2.
COMMON = ("--max_epochs", "2", "--eval_batch_size", "2", "--seed", "3")
RUN = Path("resnet20") / "version_0"


@dataclass(frozen=True)
class StopPoint:
    """Where the signal is sent: a hook (train, val, save, test), the epoch (None: any) and the batch."""

    hook: str
    epoch: int | None
    batch: int | None

    def __str__(self) -> str:
        where = f"epoch{self.epoch}" if self.epoch is not None else "end"
        return f"{self.hook}-{where}" + (f"-batch{self.batch}" if self.batch is not None else "")


class SendSignal(L.Callback):
    """Sends ``signum`` to this process once, from the hook of ``point``."""

    def __init__(self, point: StopPoint, signum: int) -> None:
        self.point, self.signum, self.sent = point, signum, False

    def _at(self, hook: str, trainer: L.Trainer, batch: int | None) -> None:
        point = self.point
        if self.sent or hook != point.hook or (point.epoch is not None and trainer.current_epoch != point.epoch):
            return
        if point.batch is None or batch == point.batch:
            self.sent = True
            os.kill(os.getpid(), self.signum)  # handled before the next Python instruction, in this thread

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, idx: int) -> None:
        self._at("train", trainer, idx)

    def on_validation_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, idx: int, dl: int = 0) -> None:
        if not trainer.sanity_checking:
            self._at("val", trainer, idx)

    def on_test_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, idx: int, dl: int = 0) -> None:
        self._at("test", trainer, idx)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: Any, checkpoint: dict) -> None:
        self._at("save", trainer, None)


def _fit_with(monkeypatch: pytest.MonkeyPatch, callback: L.Callback | None, *argv: str) -> dict:
    build = cli.build_trainer

    def with_callback(*args: Any) -> Any:
        trainer, checkpoints = build(*args)
        if callback is not None:
            trainer.callbacks.insert(0, callback)
        return trainer, checkpoints

    monkeypatch.setattr(cli, "build_trainer", with_callback)
    try:
        return fit(*argv)
    finally:
        monkeypatch.setattr(cli, "build_trainer", build)


def _outcome(logs: Path) -> dict[str, Any]:
    """What a finished run leaves: its last checkpoint, best checkpoint, validation curve and record."""
    folder = logs / RUN
    last = load_checkpoint(folder / "checkpoints" / "last.ckpt")
    best = sorted(p.name for p in (folder / "checkpoints").glob("best-*.ckpt"))
    record = json.loads((folder / "result.json").read_text())
    return {
        "last": last,
        "best": best,
        "val_acc": dict(scalars(folder)["val/acc"]),
        "record": {key: record[key] for key in ("best_val_acc", "best_epoch", "test_acc", "epochs")},
    }


def _assert_same_outcome(got: dict[str, Any], want: dict[str, Any]) -> None:
    assert got["record"] == want["record"]
    assert got["best"] == want["best"]
    assert got["val_acc"] == want["val_acc"], "every epoch validated once, with the same figures"
    a, b = got["last"], want["last"]
    assert a["global_step"] == b["global_step"] and a["epoch"] == b["epoch"]
    different = [k for k in b["state_dict"] if not torch.equal(a["state_dict"][k], b["state_dict"][k])]
    assert different == [], different[:5]
    raw_a, raw_b = a.get("current_model_state"), b.get("current_model_state")  # the raw weights, with averaging
    assert (raw_a is None) == (raw_b is None)
    if raw_b is not None:
        assert [k for k in raw_b if not torch.equal(raw_a[k], raw_b[k])] == []
    averaging = [key for key in b["callbacks"] if "WeightAveraging" in key or key in ("EMA", "SWA")]
    for key in averaging:
        assert str(a["callbacks"][key]) == str(b["callbacks"][key]), key


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The data, and each recipe's uninterrupted outcome (computed once per recipe)."""
    root = tmp_path_factory.mktemp("stop_points")
    return {"data": make_image_folder(root / "data", per_class={"train": 12, "test": 4}), "root": root, "runs": {}}


def _uninterrupted(reference: dict[str, Any], recipe: tuple[str, ...]) -> dict[str, Any]:
    if recipe not in reference["runs"]:
        logs = reference["root"] / f"whole-{len(reference['runs'])}"
        fit(*fit_args(reference["data"], logs, *COMMON, *recipe))
        reference["runs"][recipe] = _outcome(logs)
    return reference["runs"][recipe]


def _stop_and_resume(
    reference: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, point: StopPoint, signum: int,
    recipe: tuple[str, ...] = (),
) -> None:  # fmt: skip
    data, logs = reference["data"], tmp_path / "logs"
    args = fit_args(data, logs, *COMMON, *recipe)
    stopper = SendSignal(point, signum)
    with pytest.raises(TrainingInterruptedError) as stopped:
        _fit_with(monkeypatch, stopper, *args)
    assert stopper.sent and stopped.value.signum == signum and stopped.value.checkpoint is not None
    last = logs / RUN / "checkpoints" / "last.ckpt"
    assert Path(stopped.value.checkpoint) == last
    fit(*args, "--ckpt_path", str(last))
    _assert_same_outcome(_outcome(logs), _uninterrupted(reference, recipe))
    again = fit(*args, "--ckpt_path", str(last))
    assert again == {"finished_already": True}, "a finished run resumed again has nothing to do"


# Every training batch boundary (3 an epoch), validation batches (3 an epoch) in both epochs, the checkpoint
# writes at each epoch's end, and the final test.
SWEEP = [
    *(StopPoint("train", epoch, batch) for epoch in (0, 1) for batch in (0, 1, 2)),
    *(StopPoint("val", epoch, batch) for epoch in (0, 1) for batch in (0, 2)),
    StopPoint("save", 0, None),
    StopPoint("save", 1, None),
    StopPoint("test", None, 0),
    StopPoint("test", None, 5),
]


@pytest.mark.parametrize("point", SWEEP, ids=str)
def test_a_sigterm_at_any_point_of_a_fit_then_resume_ends_as_the_uninterrupted_run(
    point: StopPoint, reference: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _stop_and_resume(reference, tmp_path, monkeypatch, point, signal.SIGTERM)


@pytest.mark.slow
@pytest.mark.parametrize("point", [StopPoint("train", 0, 2), StopPoint("val", 1, 1), StopPoint("save", 1, None),
                                   StopPoint("test", None, 2)], ids=str)  # fmt: skip
def test_a_ctrl_c_at_any_point_of_a_fit_then_resume_ends_as_the_uninterrupted_run(
    point: StopPoint, reference: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _stop_and_resume(reference, tmp_path, monkeypatch, point, signal.SIGINT)


@pytest.mark.parametrize("recipe", [("--ema", "0.9"), ("--swa_epochs", "1")], ids=["ema", "swa"])
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "ctrl-c"])
@pytest.mark.parametrize("point", [StopPoint("train", 1, 1), StopPoint("val", 1, 1)], ids=str)
def test_a_stop_mid_epoch_or_in_the_last_validation_with_weight_averaging_changes_nothing(
    point: StopPoint, signum: int, recipe: tuple[str, ...], reference: dict[str, Any], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    _stop_and_resume(reference, tmp_path, monkeypatch, point, signum, recipe)


def test_an_old_best_of_a_finished_run_continues_as_a_new_run_beside_it(
    reference: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data, logs = reference["data"], tmp_path / "logs"
    args = fit_args(data, logs, *COMMON)
    fit(*args)
    run = logs / RUN
    (best,) = (run / "checkpoints").glob("best-epoch001-*.ckpt")  # the first epoch validated best; the run has two
    before = files_of(run)
    capsys.readouterr()

    fit(*args, "--ckpt_path", str(best))
    out = capsys.readouterr().out
    branch = logs / "resnet20" / "version_1"
    assert f"{best} is an earlier state of its run (its last.ckpt is at step 6, this one at step 3)" in out
    assert f"continuing it as a new run in {branch}" in out
    assert files_of(run) == before, "the run's last.ckpt, best checkpoint and result.json are left as they were"
    assert load_checkpoint(branch / "checkpoints" / "last.ckpt")["global_step"] == 6
    record = json.loads((branch / "result.json").read_text())
    assert record["epochs"] == 2 and record["best_epoch"] in (1, 2)


def _stopped_inside_the_second_epoch(
    reference: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[list[str], Path, Path]:
    """A run stopped by SIGTERM at the second batch of its second epoch: its options, log folder and last.ckpt."""
    logs = tmp_path / "logs"
    args = fit_args(reference["data"], logs, *COMMON)
    with pytest.raises(TrainingInterruptedError):
        _fit_with(monkeypatch, SendSignal(StopPoint("train", 1, 1), signal.SIGTERM), *args)
    return args, logs, logs / RUN / "checkpoints" / "last.ckpt"


def test_max_epochs_below_the_runs_position_is_refused_in_one_line(
    reference: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    args, logs, last = _stopped_inside_the_second_epoch(reference, tmp_path, monkeypatch)
    assert load_checkpoint(last)["global_step"] == 5, "stopped inside the second epoch"
    before = files_of(logs)
    capsys.readouterr()

    assert cli.main([*args, "--ckpt_path", str(last), "--max_epochs", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"fit.py: error: --max_epochs 1 ends before the run's position (inside epoch 2 (step 5) of {last}); pass "
        "--max_epochs 2 or more, or start a new run"
    ]
    assert files_of(logs) == before, "nothing written"


def test_another_process_count_is_refused_inside_an_epoch(
    reference: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    args, logs, last = _stopped_inside_the_second_epoch(reference, tmp_path, monkeypatch)
    checkpoint = load_checkpoint(last)
    assert checkpoint["world_size"] == 1
    checkpoint["world_size"] = 2  # as written inside an epoch by a run of two processes
    torch.save(checkpoint, last)
    before = files_of(logs)
    capsys.readouterr()
    assert cli.main([*args, "--ckpt_path", str(last)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{last} was written inside an epoch by 2 processes; continue it on 2" in err[0], err
    assert files_of(logs) == before
