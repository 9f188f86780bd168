"""End-to-end fits on generated image folders: train, validate, test, log, checkpoint and resume."""

from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cifar_resnet.cli import fit as cli
from tests.conftest import REPO_ROOT
from tests.helpers import fit, fit_args, scalars


def test_full_fit_validate_and_test_on_an_image_folder(tiny_folder: Path, tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    result = fit(*fit_args(tiny_folder, logs, "--max_epochs", "2"))
    run_dir = logs / "resnet20" / "version_0"
    assert result["run_dir"] == str(run_dir)
    assert 0.0 <= result["best_val_acc"] <= 1.0 and result["best_epoch"] in (1, 2), "epochs count from 1"
    assert Path(result["best_checkpoint"]).name.startswith(f"best-epoch{result['best_epoch']:03d}-")
    assert 0.0 <= result["test_acc"] <= 1.0
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert (
        Path(result["best_checkpoint"]).is_file() and Path(result["best_checkpoint"]).parent == run_dir / "checkpoints"
    )
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["arch"] == "resnet20" and saved["max_epochs"] == 2 and saved["batch_size"] == 8
    assert saved["data_dir"] == str(tiny_folder.resolve()) and saved["log_dir"] == str(logs.resolve())
    assert (saved["precision"], saved["accelerator"], saved["devices"]) == ("32-true", "cpu", 1), "resolved"

    # The checkpoint loads with weights_only=True: plain hyperparameters, no pickled objects.
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["hyper_parameters"]["arch"] == "resnet20" and ckpt["epoch"] == 1


def test_tensorboard_holds_the_scalars_and_the_augmentation_grid(tiny_folder: Path, tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    fit(*fit_args(tiny_folder, logs, "--max_epochs", "2"))
    run_dir = logs / "resnet20" / "version_0"
    series = scalars(run_dir)
    for tag in ("train/loss", "train/acc", "val/loss", "val/acc", "val/acc_best", "train/lr",
                "train/images_per_sec", "val/acc_top5", "test/acc"):  # fmt: skip
        assert tag in series, f"{tag} missing from {sorted(series)}"
    assert len(series["val/acc"]) == 2 and len(series["train/lr"]) == 6  # 30 train images / 8 = 3 steps x 2
    assert all(rate > 0 for _, rate in series["train/images_per_sec"])
    acc = EventAccumulator(str(run_dir), size_guidance={"images": 0})
    acc.Reload()
    assert "train/augmented_samples" in acc.Tags()["images"]
    image = acc.Images("train/augmented_samples")[0]
    assert image.width > 100 and image.height > 50


def test_lr_follows_the_cosine_over_the_whole_run(tiny_folder: Path, tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    fit(*fit_args(tiny_folder, logs, "--max_epochs", "3", "--lr", "0.1", "--no_test"))
    lrs = [v for _, v in scalars(logs / "resnet20" / "version_0")["train/lr"]]
    total = 9  # 3 steps an epoch
    expected = [0.05 * (1 + torch.cos(torch.tensor(torch.pi * s / total))).item() for s in range(total)]
    assert lrs == pytest.approx(expected, rel=1e-5)


def test_warmup_rises_linearly_then_decays(tiny_folder: Path, tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    fit(*fit_args(tiny_folder, logs, "--max_epochs", "3", "--warmup_epochs", "1", "--no_test"))
    lrs = [v for _, v in scalars(logs / "resnet20" / "version_0")["train/lr"]]
    assert lrs[:3] == pytest.approx([0.05 / 3, 0.1 / 3, 0.05], rel=1e-5)
    assert all(a >= b for a, b in itertools.pairwise(lrs[2:])) and lrs[-1] < 0.01


class _StopAfter(L.Callback):
    """Ends training after ``epochs`` epochs, as an interruption at an epoch boundary would."""

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch + 1 >= self.epochs:
            trainer.should_stop = True


def test_resume_continues_the_same_run_with_the_same_lr_curve_and_best(
    tiny_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    common = ("--max_epochs", "4", "--no_test", "--seed", "3")
    whole_logs, split_logs = tmp_path / "whole", tmp_path / "split"
    fit(*fit_args(tiny_folder, whole_logs, *common))

    build = cli.build_trainer

    def interrupted(config, label):  # the first run stops after 2 of its 4 epochs
        trainer, checkpoint = build(config, label)
        trainer.callbacks.append(_StopAfter(2))
        return trainer, checkpoint

    monkeypatch.setattr(cli, "build_trainer", interrupted)
    fit(*fit_args(tiny_folder, split_logs, *common))
    monkeypatch.setattr(cli, "build_trainer", build)
    run_dir = split_logs / "resnet20" / "version_0"
    first_best = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["callbacks"]
    result = fit(*fit_args(tiny_folder, split_logs, *common, "--ckpt_path", "last"))

    assert sorted(p.name for p in (split_logs / "resnet20").iterdir()) == ["version_0"], "no new version"
    assert (run_dir / "config.yaml").is_file() and (run_dir / "config.resume1.yaml").is_file()
    whole, split = scalars(whole_logs / "resnet20" / "version_0"), scalars(run_dir)
    assert [s for s, _ in split["train/lr"]] == [s for s, _ in whole["train/lr"]]
    assert [v for _, v in split["train/lr"]] == pytest.approx([v for _, v in whole["train/lr"]], rel=1e-6)
    assert [s for s, _ in split["val/acc"]] == [s for s, _ in whole["val/acc"]], "epochs continue, none repeat"

    val_accs = [v for _, v in split["val/acc"]]
    assert result["best_val_acc"] == pytest.approx(max(val_accs))
    assert [v for _, v in split["val/acc_best"]][-1] == pytest.approx(max(val_accs))
    earlier_best = next(v["best_model_score"] for k, v in first_best.items() if k.startswith("ModelCheckpoint"))
    assert result["best_val_acc"] >= float(earlier_best), "a resumed run never keeps a worse best"
    assert len(list((run_dir / "checkpoints").glob("best-*.ckpt"))) == 1


def test_ckpt_path_last_without_a_checkpoint_fails_clearly(tiny_folder: Path, tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "fit.py"), *fit_args(tiny_folder, logs), "--ckpt_path", "last"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == [f"fit.py: error: --ckpt_path last: no last.ckpt under {logs}/resnet20/version_*/checkpoints/; "
                     "start a new run without --ckpt_path, or pass the checkpoint's path"]  # fmt: skip
    assert not (logs / "resnet20").exists(), "nothing trained, nothing written"


def test_resume_with_another_arch_is_refused(tiny_folder: Path, tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    fit(*fit_args(tiny_folder, logs, "--max_epochs", "1", "--no_test"))
    ckpt = logs / "resnet20" / "version_0" / "checkpoints" / "last.ckpt"
    args = fit_args(tiny_folder, logs, "--ckpt_path", str(ckpt))
    args[args.index("resnet20")] = "resnet32"
    with pytest.raises(
        cli.UserError, match=r"would change what it learns: --arch resnet32 \(the run.s: --arch resnet20\)"
    ):
        fit(*args)


def test_val_size_zero_validates_on_the_test_split(tiny_folder: Path, tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    args = fit_args(tiny_folder, logs, "--max_epochs", "1")
    args[args.index("--val_size") + 1] = "0"
    result = fit(*args)
    assert result["test_selected_on_test"] is True
    assert result["test_acc"] == pytest.approx(result["best_val_acc"])


def test_a_longer_max_epochs_on_resume_replans_the_cosine(tiny_folder: Path, tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    fit(*fit_args(tiny_folder, logs, "--max_epochs", "2", "--no_test"))
    last = logs / "resnet20" / "version_0" / "checkpoints" / "last.ckpt"
    fit(*fit_args(tiny_folder, logs, "--max_epochs", "4", "--no_test", "--ckpt_path", str(last)))
    lrs = dict(scalars(logs / "resnet20" / "version_0")["train/lr"])
    total = 12  # 3 steps an epoch, 4 epochs: the remaining steps follow the cosine of the new length
    expected = {s: 0.025 * (1 + torch.cos(torch.tensor(torch.pi * s / total))).item() for s in range(6, total)}
    assert [lrs[s] for s in range(6, total)] == pytest.approx(list(expected.values()), rel=1e-5)
    assert all(a > b for a, b in itertools.pairwise(lrs[s] for s in range(6, total))), "no rise past the old end"


def test_line_progress_reports_each_epochs_own_training_and_validation_metrics(
    tiny_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    logs = tmp_path / "logs"
    args = fit_args(tiny_folder, logs, "--max_epochs", "3")
    args[args.index("--progress") + 1] = "lines"
    fit(*args)
    lines = [line for line in capsys.readouterr().out.splitlines() if " done in " in line]
    assert [line.split()[1] for line in lines] == ["1", "2", "3"], lines
    assert ["  eta " in line for line in lines] == [True, True, False]  # time left, until the last epoch

    logged = scalars(logs / "resnet20" / "version_0")
    for key in ("val/acc", "train/acc"):
        shown = [float(line.split(f"{key} ")[1].split()[0]) for line in lines]
        expected = [value for _, value in logged[key]]
        assert shown == [float(f"{value:.4g}") for value in expected], key


def test_durations_read_as_hours_minutes_or_seconds() -> None:
    from cifar_resnet.training.callbacks import format_duration

    assert [format_duration(s) for s in (0.4, 45, 60, 754.6, 3600, 11_100)] == [
        "0s", "45s", "1m 00s", "12m 35s", "1h 00m", "3h 05m"
    ]  # fmt: skip


def test_the_summary_says_why_a_test_or_a_validation_is_missing_without_lightnings_warning(
    tiny_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], recwarn: pytest.WarningsRecorder
) -> None:
    assert cli.main(fit_args(tiny_folder, tmp_path / "a", "--max_epochs", "1", "--no_test")) == 0
    out = capsys.readouterr().out
    assert "test acc        not measured (--no_test)" in out and "no test split" not in out, "tiny_folder has test/"

    assert cli.main(fit_args(tiny_folder, tmp_path / "b", "--max_epochs", "2", "--limit_val_batches", "0")) == 0
    out = capsys.readouterr().out
    assert "validation      none (--limit_val_batches 0): no best checkpoint; the test used the last weights" in out
    assert "test acc" in out
    assert not [w for w in recwarn if "could not find the monitored key" in str(w.message)], "Lightning's warning"


def test_fast_dev_run_leaves_no_run_folder(tiny_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    logs = tmp_path / "logs"
    assert cli.main(fit_args(tiny_folder, logs, "--fast_dev_run")) == 0
    assert not list(logs.rglob("*")), "nothing saved"
    assert "curves" not in capsys.readouterr().out, "no curves to look at"


def test_resuming_with_another_log_dir_says_it_has_no_effect(
    tiny_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    logs, elsewhere = tmp_path / "logs", tmp_path / "elsewhere"
    fit(*fit_args(tiny_folder, logs, "--max_epochs", "1", "--no_test"))
    last = logs / "resnet20" / "version_0" / "checkpoints" / "last.ckpt"
    capsys.readouterr()
    argv = fit_args(tiny_folder, elsewhere, "--max_epochs", "2", "--no_test", "--ckpt_path", str(last))
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert f"--log_dir {elsewhere} has no effect: the run continues in {logs / 'resnet20' / 'version_0'}" in out
    assert "(was --log_dir" not in out and not elsewhere.exists()
    assert f"tensorboard --logdir {logs}" in out
    assert torch.load(last, weights_only=True)["epoch"] == 1, "the run went on in its own folder"
