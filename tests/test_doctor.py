"""``python -m cifar_resnet doctor`` on the CPU: its checks pass or are skipped with a reason, its table is written
as JSON, and a graphed step that trains differently from the eager one makes it exit non-zero."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cifar_resnet import environment
from cifar_resnet.__main__ import main as cifar_main
from cifar_resnet.tools.doctor import Doctor
from cifar_resnet.training.step import EagerReplayBackend

SPEED_ROWS = [f"speed {arch} bs{batch}" for arch in ("resnet18", "resnet50") for batch in (128, 512)]


def _rows(out: Path) -> dict[str, dict]:
    return {check["name"]: check for check in json.loads(out.read_text())["checks"]}


def test_the_doctor_checks_the_cpu_step_and_writes_its_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "doctor.json"
    code = cifar_main(["doctor", "--device", "cpu", "--out", str(out)])
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    rows = _rows(out)
    for name in ("graphed step", "graphed = eager", "host reads", "host reads with --ema", "checkpoint save", "resume"):
        assert rows[name]["status"] == "pass", rows[name]
        assert f"{name} " in printed, "the table is printed"
    assert "equal bits" in rows["graphed = eager"]["detail"] and rows["graphed = eager"]["figures"]["bitwise"]
    assert "equal bits" in rows["resume"]["detail"]
    assert rows["host reads"]["figures"]["reads"] > 0, "the logged loss is read: the count sees reads"
    assert rows["checkpoint save"]["figures"]["ms"] > 0
    for name in SPEED_ROWS:
        assert rows[name]["status"] == "skipped" and rows[name]["detail"] == "needs CUDA"
    # EMA adds no host read: the same reads, over the same steps, as the plain step.
    ema, plain = rows["host reads with --ema"]["figures"], rows["host reads"]["figures"]
    assert (ema["steps"], ema["reads"]) == (plain["steps"], plain["reads"])
    assert report["passed"] and code == 0, [name for name, row in rows.items() if row["status"] == "fail"]
    assert report["device"] == environment.device_name(torch.device("cpu"))
    assert report["precision"] == "32-true" and report["versions"]["torch"]
    assert "doctor: training graphed" in printed, "progress lines while it runs"


class SkipsTheUpdate(EagerReplayBackend):
    """A broken graph: its replays run the step but silently skip the SGD update."""

    def replay(self) -> None:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(torch.optim.SGD, "step", lambda self, closure=None: None)
            super().replay()


def test_the_doctor_fails_when_the_graphed_step_trains_differently(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(Doctor, "graph_backend", lambda self: SkipsTheUpdate)
    out = tmp_path / "doctor.json"
    assert cifar_main(["doctor", "--device", "cpu", "--out", str(out)]) == 1
    rows = _rows(out)
    assert rows["graphed = eager"]["status"] == "fail", rows["graphed = eager"]
    assert rows["graphed = eager"]["figures"]["relative_l2"] > 0
    assert json.loads(out.read_text())["passed"] is False
    assert "FAILED" in capsys.readouterr().out


def test_the_doctor_refuses_cuda_without_a_gpu_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert cifar_main(["doctor", "--device", "cuda", "--out", str(tmp_path / "d.json")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "doctor: error: --device cuda: no CUDA GPU is visible; use --device cpu"
    ]
    assert not (tmp_path / "d.json").exists()
