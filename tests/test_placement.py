"""Where and how a fit runs by default: one process unless more are asked for, and --deterministic makes a GPU
resume bitwise by turning cudnn.benchmark off."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from cifar_resnet.cli import fit as cli
from cifar_resnet.cli.arguments import resolve
from cifar_resnet.config import TrainerConfig
from cifar_resnet.training.trainer import RunLabel, build_trainer


def test_the_headline_command_trains_one_process_and_more_are_on_request(capsys: pytest.CaptureFixture[str]) -> None:
    assert resolve(["--arch", "resnet50", "--max_epochs", "200"]).config.trainer.devices == 1
    assert cli.main(["--arch", "resnet50", "--max_epochs", "200", "--print_config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["devices"] == 1, "the replayable config says one device"
    assert resolve(["--devices", "auto"]).config.trainer.devices == "auto"
    assert resolve(["--devices", "4"]).config.trainer.devices == 4


@pytest.mark.parametrize(("deterministic", "benchmark"), [(True, False), (False, True)])
def test_deterministic_turns_cudnn_benchmark_off_on_a_gpu(
    deterministic: bool, benchmark: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A CUDA machine as build_trainer sees it; Lightning finds no device to use (CUDA_VISIBLE_DEVICES is empty)
    # and places the run on the CPU, after it has set the flags.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", not benchmark)
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", "")  # Lightning sets it for deterministic runs
    matmul_precision = torch.get_float32_matmul_precision()
    try:
        config = TrainerConfig(deterministic=deterministic, log_dir=str(tmp_path), logger="csv", progress="none")
        build_trainer(config, RunLabel(name="resnet20"))
        assert torch.backends.cudnn.benchmark is benchmark
        assert torch.are_deterministic_algorithms_enabled() is deterministic
    finally:
        torch.use_deterministic_algorithms(False)
        torch.set_float32_matmul_precision(matmul_precision)
