"""--logger: CSV, MLflow and W&B write into the run folder, continue on resume, and plot.py reads CSV and MLflow."""

from __future__ import annotations

import csv
import importlib.util
import os
import warnings
from pathlib import Path

import pytest

from cifar_resnet.cli import fit as fit_cli
from cifar_resnet.cli import plot as plot_cli
from cifar_resnet.tools.curves import read_scalars
from cifar_resnet.training import loggers
from tests.helpers import fit_args


def needs(module: str) -> None:
    """Skip when an optional logger package is not installed; under CI, which installs the extras of the README's
    test command, fail instead."""
    if importlib.util.find_spec(module) is not None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"CI installs the {module} extra (see the README's test command), but {module} does not import")
    pytest.skip(f"{module} is not installed (pip install -e '.[{module}]')")


def test_csv_logger_writes_metrics_csv_that_plot_reads_and_a_resume_continues(
    tiny_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    logs = tmp_path / "logs"
    assert fit_cli.main(fit_args(tiny_folder, logs, "--logger", "csv", "--max_epochs", "2")) == 0
    run = logs / "resnet20" / "version_0"
    out = capsys.readouterr().out
    assert "scripts/plot.py" in out and "tensorboard" not in out, "the report points at the CSV's tools"
    assert not list(run.glob("events.out.tfevents.*")), "no TensorBoard files with --logger csv"
    assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "config.yaml").is_file()
    with open(run / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    columns = set(rows[0])
    for tag in ("train/loss", "train/acc", "val/loss", "val/acc", "train/lr", "train/loss_step", "test/acc"):
        assert tag in columns, f"{tag} missing from {sorted(columns)}"
    series = read_scalars(run)
    assert len(series["val/acc"]) == 2 and len(series["train/lr"]) == 6  # 30 images / batch 8: 3 steps x 2 epochs
    assert "val/acc_class/class_0" in series and "hp/best_val_acc" in series

    assert plot_cli.main([str(run)]) == 0
    for name in ("loss.png", "accuracy.png", "lr.png"):
        assert (run / "plots" / name).stat().st_size > 1000, name

    # A resume continues the same metrics.csv (Lightning's CSV writer would delete it).
    more = ["--ckpt_path", str(run / "checkpoints" / "last.ckpt"), "--max_epochs", "3", "--no_test"]
    capsys.readouterr()
    assert fit_cli.main(more) == 0
    curves = [line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("curves")]
    assert curves == [f"  curves          python scripts/plot.py {run} (from metrics.csv)"], "the run's own logger"
    series = read_scalars(run)
    assert [step for step, _ in series["train/lr"]] == list(range(9)), "steps of all three epochs, in one file"
    assert len(series["val/acc"]) == 3


def test_mlflow_logger_writes_a_file_store_in_the_run_folder_readable_by_mlflow(
    tiny_folder: Path, tmp_path: Path
) -> None:
    needs("mlflow")
    from mlflow.tracking import MlflowClient

    logs = tmp_path / "logs"
    assert fit_cli.main(fit_args(tiny_folder, logs, "--logger", "mlflow", "--max_epochs", "1")) == 0
    run = logs / "resnet20" / "version_0"
    assert (run / "checkpoints" / "last.ckpt").is_file(), "checkpoints in the run folder, not in the store"
    record = loggers._read_run_file(run / loggers.MLFLOW_RUN_FILE)
    client = MlflowClient(record["tracking_uri"])
    assert record["tracking_uri"] == (run / "mlruns").resolve().as_uri()
    mlrun = client.get_run(record["run_id"])
    assert mlrun.info.run_name == "version_0" and mlrun.data.params["arch"] == "resnet20"
    for key in ("train/loss", "val/acc", "train/lr", "test/acc"):
        assert client.get_metric_history(record["run_id"], key), key
    artifacts = [a.path for a in client.list_artifacts(record["run_id"], "train")]
    artifacts += [a.path for a in client.list_artifacts(record["run_id"], "val")]
    assert any("augmented_samples" in p for p in artifacts) and any("confusion_matrix" in p for p in artifacts)
    lrs = read_scalars(run)["train/lr"]
    assert [v for _, v in lrs] == [m.value for m in client.get_metric_history(record["run_id"], "train/lr")]

    # A resume, with a changed free option, continues the same MLflow run.
    more = ["--ckpt_path", str(run / "checkpoints" / "last.ckpt"), "--max_epochs", "2", "--no_test"]
    assert fit_cli.main(more) == 0
    assert len(client.search_runs([mlrun.info.experiment_id])) == 1
    assert len(client.get_metric_history(record["run_id"], "val/acc")) == 2


def test_wandb_offline_writes_its_run_in_the_run_folder(
    tiny_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    needs("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    logs = tmp_path / "logs"
    args = fit_args(tiny_folder, logs, "--logger", "wandb", "--wandb_project", "p", "--max_epochs", "1", "--no_test")
    monkeypatch.delenv("WANDB_DIR")  # save_dir decides where the run goes
    import wandb

    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*could not log.*")  # images must reach W&B, not be dropped
            assert fit_cli.main(args) == 0
    finally:
        wandb.teardown()  # ends W&B's service process, which would otherwise outlive the test
    run = logs / "resnet20" / "version_0"
    run_id = loggers._read_run_file(run / loggers.WANDB_RUN_FILE)["run_id"]
    offline = list((run / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(offline) == 1 and list(offline[0].glob("*.wandb")), sorted((run / "wandb").iterdir())
    images = [p.name for p in (offline[0] / "files" / "media" / "images").rglob("*.png")]
    assert any("augmented_samples" in n for n in images) and any("confusion_matrix" in n for n in images), images
    assert (run / "checkpoints" / "last.ckpt").is_file()


def test_a_missing_logger_package_is_one_line_and_writes_nothing(
    tiny_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    logs = tmp_path / "logs"
    assert fit_cli.main(fit_args(tiny_folder, logs, "--logger", "mlflow")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ['fit.py: error: --logger mlflow needs mlflow: pip install -e ".[mlflow]"'], err
    assert not logs.exists()
