"""The benchmark script runs end to end on tiny data and reports every figure as a JSON line."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from cifar_resnet.cli.benchmark import main as benchmark_main
from cifar_resnet.training.step import EagerReplayBackend


def _tiny_argv(data: Path, tmp_path: Path, *extra: str) -> list[str]:
    """A CPU benchmark over the tiny generated folder: 4-image batches, one warm-up iteration."""
    return ["--device", "cpu", "--data_dir", str(data), "--cache_dir", str(tmp_path / "c"),
            "--batch_size", "4", "--val_size", "6", "--warmup", "1", *extra]  # fmt: skip


def _figures(output: str) -> dict[str, dict]:
    """The JSON lines of a benchmark run, by figure name."""
    records = (json.loads(line) for line in output.splitlines() if line.startswith("{"))
    return {record["name"]: record for record in records}


def test_benchmark_reports_pipeline_training_and_ratios(
    tiny_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = _tiny_argv(tiny_folder, tmp_path, "--iterations", "2", "--rounds", "2")
    assert benchmark_main(argv) == 0
    figures = _figures(capsys.readouterr().out)
    train = "train/resnet20/bs4"
    for name in ("data/ours", "data/pil_baseline", f"{train}/lightning", f"{train}/plain_loop"):
        assert figures[name]["value"] > 0 and figures[name]["unit"] == "images/s"
    ratio = figures["data/ratio_ours_over_pil"]["value"]
    assert ratio == pytest.approx(figures["data/ours"]["value"] / figures["data/pil_baseline"]["value"])
    step_ratio = figures[f"{train}/step_time_ratio_lightning_over_plain"]
    lightning, plain = (figures[f"{train}/{name}"]["details"]["rounds"] for name in ("lightning", "plain_loop"))
    assert len(lightning) == len(plain) == 2
    assert step_ratio["details"]["rounds"] == pytest.approx([p / q for p, q in zip(plain, lightning, strict=True)])
    assert step_ratio["value"] == pytest.approx(sum(step_ratio["details"]["rounds"]) / 2)  # median of two
    assert "data/ours_no_workers" not in figures  # only measured when the baseline has workers
    assert f"{train}/graphed_plain_loop" not in figures, "the CUDA-graphed ceiling is measured on CUDA only"
    gap, share = figures[f"{train}/between_epochs"]["value"], figures[f"{train}/between_epochs_share"]
    epoch = share["details"]["epoch_training_seconds"]
    assert gap > 0 and share["value"] == pytest.approx(gap / (epoch + gap), rel=1e-3)
    projected = figures[f"{train}/projected_200_epochs"]
    assert projected["details"]["train_images"] == 3 * 12 - 6
    assert epoch == pytest.approx(30 / figures[f"{train}/lightning"]["value"], rel=1e-3)
    assert projected["value"] == pytest.approx(200 * (epoch + gap) / 60, rel=1e-3)


def test_benchmark_times_every_batch_size_given(
    tiny_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = _tiny_argv(tiny_folder, tmp_path, "--iterations", "1", "--rounds", "1")
    argv[argv.index("--batch_size") + 1 : argv.index("--batch_size") + 2] = ["4", "5"]
    assert benchmark_main(argv) == 0
    figures = _figures(capsys.readouterr().out)
    for batch in (4, 5):
        record = figures[f"train/resnet20/bs{batch}/lightning"]
        assert record["details"]["batch_size"] == batch and record["value"] > 0


def test_benchmark_with_workers_also_times_our_pipeline_without_them(
    tiny_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = _tiny_argv(tiny_folder, tmp_path, "--iterations", "1", "--workers", "1")
    assert benchmark_main(argv) == 0
    figures = _figures(capsys.readouterr().out)
    assert figures["data/ours"]["details"]["workers"] == 1
    assert figures["data/pil_baseline"]["details"]["workers"] == 1
    assert figures["data/ours_no_workers"]["details"]["workers"] == 0
    ratio = figures["data/ratio_ours_no_workers_over_pil"]["value"]
    assert ratio == pytest.approx(figures["data/ours_no_workers"]["value"] / figures["data/pil_baseline"]["value"])


def test_benchmark_on_missing_cuda_is_a_clear_error(tiny_folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert benchmark_main(["--device", "cuda", "--data_dir", str(tiny_folder)]) == 2
    assert "no CUDA GPU is visible" in capsys.readouterr().err


@pytest.mark.parametrize(("flag", "value"), [("--rounds", "0"), ("--iterations", "0"), ("--workers", "-1")])
def test_benchmark_refuses_impossible_counts_in_one_line(
    flag: str, value: str, tiny_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert benchmark_main(["--device", "cpu", "--data_dir", str(tiny_folder), flag, value]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"benchmark.py: error: {flag} must be at least {0 if flag == '--workers' else 1}, got {value}"]


def test_benchmark_profile_names_the_top_operators_and_writes_a_trace(
    tiny_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trace = tmp_path / "trace.json"
    argv = _tiny_argv(tiny_folder, tmp_path, "--iterations", "1", "--rounds", "1", "--profile", "2",
                      "--profile_trace", str(trace))  # fmt: skip
    assert benchmark_main(argv) == 0
    out = capsys.readouterr().out
    top = [record for name, record in _figures(out).items() if name.startswith("profile/resnet20/top")]
    assert len(top) == 10
    shares = [record["value"] for record in top]
    assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 1.0 + 1e-6
    names = {record["details"]["op"] for record in top}
    assert any("conv" in name for name in names), names  # a ResNet's time goes to its convolutions
    assert "Self CPU" in out  # the profiler's own table is printed
    assert json.loads(trace.read_text())["traceEvents"]


def test_benchmark_with_more_warmup_than_batches_says_so_in_one_line(
    tiny_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # 30 training images in batches of 4: 7 batches an epoch, all of them warm-up.
    assert benchmark_main(_tiny_argv(tiny_folder, tmp_path, "--iterations", "1", "--warmup", "7")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["benchmark.py: error: an epoch has only 7 training batches, not more than --warmup 7; "
                   "lower --warmup or --batch_size"]  # fmt: skip


def test_benchmark_recipes_times_each_policy_and_mix_and_its_share_of_a_step(
    tiny_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from cifar_resnet.tools.benchmark import RECIPES

    assert benchmark_main(_tiny_argv(tiny_folder, tmp_path, "--iterations", "2", "--rounds", "2", "--recipes")) == 0
    out = capsys.readouterr().out
    figures = _figures(out)
    step = figures["recipes/resnet20_training_step"]["value"]
    base = figures["recipes/crop+flip"]["value"]
    assert step > 0 and base > 0 and "data/ours" not in figures, "--recipes times the recipes only"
    for name in RECIPES:
        assert figures[f"recipes/{name}"]["value"] > 0 and figures[f"recipes/{name}"]["unit"] == "images/s"
        assert len(figures[f"recipes/{name}"]["details"]["rounds"]) == 2
        if name != "crop+flip":
            added = max(0.0, 1 / figures[f"recipes/{name}"]["value"] - 1 / base)
            assert figures[f"recipes/{name}/share_of_step"]["value"] == pytest.approx(100 * added / (1 / step + added))
    assert "| recipes/autoaugment " in out, "the table lists the figures"


def test_benchmark_checkpoint_times_a_save_per_arch_without_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    missing = tmp_path / "no_data_here"
    assert benchmark_main(["--checkpoint", "--device", "cpu", "--archs", "resnet20", "--iterations", "2",
                           "--data_dir", str(missing)]) == 0  # fmt: skip
    figures = {f["name"]: f for f in map(json.loads, (x for x in capsys.readouterr().out.splitlines() if x[:1] == "{"))}
    assert set(figures) == {"checkpoint/resnet20/training_thread", "checkpoint/resnet20/background_write"}
    for figure in figures.values():
        assert figure["unit"] == "ms per save" and figure["value"] > 0
        assert 1.5 < figure["details"]["megabytes"] < 3, "resnet20's weights and momentum: about 2.2 MB"
    assert not missing.exists()


class RecordedGraph(EagerReplayBackend):
    """The CPU stand-in for a CUDA graph, noting each instance and its capture in ``events``."""

    events: list[str] = []  # noqa: RUF012

    def __init__(self) -> None:
        super().__init__()
        RecordedGraph.events.append("graph created")

    def capture(self, run: Callable[[], None]) -> None:
        RecordedGraph.events.append("capture")
        super().capture(run)


@pytest.fixture
def graphs_on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Our step graphed on the CPU (through the stand-in), as it is on a GPU; the events seen."""
    from cifar_resnet.training.module import ImageClassifier

    RecordedGraph.events = []
    monkeypatch.setattr(ImageClassifier, "graph_backend", RecordedGraph)
    return RecordedGraph.events


def test_benchmark_no_cuda_graphs_times_the_eager_step(
    graphs_on_the_cpu: list[str], tiny_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = _tiny_argv(tiny_folder, tmp_path, "--iterations", "1", "--rounds", "1", "--no_cuda_graphs")
    assert benchmark_main(argv) == 0
    figures = _figures(capsys.readouterr().out)
    lightning = figures["train/resnet20/bs4/lightning"]
    assert lightning["value"] > 0 and lightning["details"]["cuda_graphs"] is False
    assert graphs_on_the_cpu == [], "no fit of the benchmark built a graph"


def test_benchmark_profile_starts_before_the_capture_and_covers_the_replayed_step(
    graphs_on_the_cpu: list[str], tiny_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    import torch

    start = torch.profiler.profile.start

    def noted_start(self: torch.profiler.profile) -> None:
        graphs_on_the_cpu.append("profiler started")
        start(self)

    monkeypatch.setattr(torch.profiler.profile, "start", noted_start)
    # 7 batches of 4: 3 graph warm-ups, the capture at batch 3, the profile records batches 5 and 6 (replays).
    argv = _tiny_argv(tiny_folder, tmp_path, "--iterations", "1", "--rounds", "1", "--profile", "2")
    argv[argv.index("--warmup") + 1] = "5"
    graphs_on_the_cpu.clear()
    assert benchmark_main(argv) == 0
    out = capsys.readouterr().out
    profiled = graphs_on_the_cpu[graphs_on_the_cpu.index("profiler started") - 1 :]
    assert profiled == ["graph created", "profiler started", "capture"], graphs_on_the_cpu
    top = [record for name, record in _figures(out).items() if name.startswith("profile/resnet20/top")]
    names = {record["details"]["op"] for record in top}
    assert any("convolution" in name for name in names), names  # the replayed step's ops are in the table
    convolutions = [record for record in top if record["details"]["op"] == "aten::convolution_backward"]
    assert [record["details"]["calls"] for record in convolutions] == [2 * 19], "the 2 recorded steps, no more"
    assert not any(name.startswith("ProfilerStep") for name in names), "operators only, not the step labels"
