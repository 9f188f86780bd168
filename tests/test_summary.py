"""Model summary: parameter/MAC counts, layer table and the ``scripts/summary.py`` CLI."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

from cifar_resnet.cli import summary as summary_cli
from cifar_resnet.cli.summary import format_layer_table, format_model_rows
from cifar_resnet.models import create_model, list_models
from cifar_resnet.models.summary import ModelRow, count_macs, count_params, layer_table, model_rows

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "summary.py"

# Reference MACs for one 1x3x32x32 image.
EXPECTED_MACS = {"resnet18": 0.556e9, "resnet50": 1.298e9, "resnet20": 40.6e6, "resnet56": 125.5e6}


def load_script():
    spec = importlib.util.spec_from_file_location("summary_script", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def macs_by_hooks(model: nn.Module) -> int:
    """Independent count: k*k*cin/groups*cout*H*W per conv plus in*out per linear."""
    total = 0

    def conv_hook(m: nn.Conv2d, _inp: object, out: torch.Tensor) -> None:
        nonlocal total
        k = m.kernel_size[0] * m.kernel_size[1]
        total += k * (m.in_channels // m.groups) * m.out_channels * out.shape[2] * out.shape[3]

    def linear_hook(m: nn.Linear, _inp: object, _out: torch.Tensor) -> None:
        nonlocal total
        total += m.in_features * m.out_features

    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            m.register_forward_hook(conv_hook)
        elif isinstance(m, nn.Linear):
            m.register_forward_hook(linear_hook)
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, 32, 32))
    return total


@pytest.mark.parametrize("arch", EXPECTED_MACS)
def test_macs_match_reference(arch: str) -> None:
    model = create_model(arch)
    macs = count_macs(model)
    assert macs == pytest.approx(EXPECTED_MACS[arch], rel=0.005)
    assert macs == macs_by_hooks(create_model(arch))


def test_count_macs_restores_mode_and_params() -> None:
    model = create_model("resnet20").train()
    assert count_macs(model) > 0
    assert model.training
    assert count_params(model) == 269_722
    model.fc.requires_grad_(False)
    assert count_params(model, trainable_only=True) == 269_722 - 650


def test_layer_table_top_level() -> None:
    model = create_model("resnet20")
    rows = layer_table(model)
    assert [r.name for r in rows] == ["stem", "layer1", "layer2", "layer3", "avgpool", "fc"]
    assert [r.output_shape for r in rows][1:4] == [(1, 16, 32, 32), (1, 32, 16, 16), (1, 64, 8, 8)]
    assert rows[-1].output_shape == (1, 10)
    assert sum(r.params for r in rows) == count_params(model)
    text = format_layer_table(rows)
    assert "1x64x8x8" in text and "203,520" in text


@pytest.mark.parametrize("arch", ["resnet20", "resnet18", "preact_resnet20"])
def test_layer_table_leaves_cover_all_params(arch: str) -> None:
    model = create_model(arch)
    rows = layer_table(model, depth=99)
    unique = {r.name: r.params for r in rows}  # shared modules (e.g. ReLU) appear once per call
    assert sum(unique.values()) == count_params(model)
    assert all("." in r.name or r.name in {"conv1", "bn1", "relu", "maxpool", "avgpool", "fc"} for r in rows)


def test_layer_table_depth_two() -> None:
    rows = layer_table(create_model("resnet20"), depth=2)
    names = [r.name for r in rows]
    assert names[:3] == ["stem.conv", "stem.bn", "stem.relu"]
    assert "layer3.2" in names and names[-1] == "fc"
    with pytest.raises(ValueError):
        layer_table(create_model("resnet20"), depth=0)


def test_model_rows_and_markdown() -> None:
    rows = model_rows(["resnet20", "resnet18"])
    assert [(r.name, r.params) for r in rows] == [("resnet20", 269_722), ("resnet18", 11_173_962)]
    assert all(isinstance(r, ModelRow) and r.macs > 0 for r in rows)
    md = [
        [cell.strip() for cell in line.strip("|").split("|")]
        for line in format_model_rows(rows, markdown=True).splitlines()
    ]
    assert md[0] == ["model", "params", "MACs (1x3x32x32)"]
    assert md[1][1].endswith(":") and not md[1][0].endswith(":"), "numbers right-aligned, names left"
    assert md[2] == ["`resnet20`", "269,722", "40.55 M"]
    assert md[3][:2] == ["`resnet18`", "11,173,962"] and md[3][2].startswith("555.")
    assert "resnet18" in format_model_rows(rows)


def test_every_model_is_listed_shallow_to_deep() -> None:
    ordered = list_models()
    assert ordered.index("resnet20") < ordered.index("resnet110") < ordered.index("resnet1202")
    assert ordered.index("resnet18") < ordered.index("resnet50") < ordered.index("resnet152")


def test_script_main_in_process(capsys: pytest.CaptureFixture[str]) -> None:
    assert load_script().main(["--arch", "preact_resnet20", "--depth", "2"]) == 0
    out = capsys.readouterr().out
    assert "final_act.bn" in out and "params: 269,722" in out and "MACs:   40.55 M" in out


def _summary_main(argv: list[str]) -> int:
    """The script's entry point in-process (the installed command runs in test_config's install test)."""
    try:
        return summary_cli.main(argv)
    except SystemExit as exit_:  # argparse's own errors
        return int(exit_.code or 0)


def test_script_arch(capsys: pytest.CaptureFixture[str]) -> None:
    assert _summary_main(["--arch", "resnet20"]) == 0
    out = capsys.readouterr().out
    assert "layer3" in out
    assert "params: 269,722" in out
    assert "MACs:   40.55 M" in out


def test_script_unknown_arch_exits_2_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert _summary_main(["--arch", "resnet19"]) == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1
    assert "resnet19" in lines[0]
    assert all(name in lines[0] for name in list_models())
    assert captured.out == ""
