"""The benchmark script runs end to end on tiny data and reports every figure as a JSON line."""

import json
from pathlib import Path

import pytest

from cifar_resnet.benchmark_cli import benchmark_main


def test_benchmark_reports_pipeline_training_and_ratios(
    tiny_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--device", "cpu", "--data_dir", str(tiny_folder), "--cache_dir", str(tmp_path / "c"),
            "--batch_size", "4", "--val_size", "6", "--warmup", "1", "--iterations", "2"]  # fmt: skip
    assert benchmark_main(argv) == 0
    figures = {}
    for line in capsys.readouterr().out.splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            figures[record["name"]] = record
    for name in ("data/ours", "data/pil_baseline", "train/resnet20/lightning", "train/resnet20/plain_loop"):
        assert figures[name]["value"] > 0 and figures[name]["unit"] == "images/s"
    ratio = figures["data/ratio_ours_over_pil"]["value"]
    assert ratio == pytest.approx(figures["data/ours"]["value"] / figures["data/pil_baseline"]["value"])
    step_ratio = figures["train/resnet20/step_time_ratio_lightning_over_plain"]["value"]
    expected = figures["train/resnet20/plain_loop"]["value"] / figures["train/resnet20/lightning"]["value"]
    assert step_ratio == pytest.approx(expected)


def test_benchmark_on_missing_cuda_is_a_clear_error(tiny_folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert benchmark_main(["--device", "cuda", "--data_dir", str(tiny_folder)]) == 2
    assert "no CUDA GPU is visible" in capsys.readouterr().err
