"""Model registry: shapes, exact parameter counts, torchvision equivalence, init and shortcuts."""

from __future__ import annotations

import ast
import functools
import math
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.resnet import ResNet

from cifar_resnet.models import ModelRegistry, create_model, list_models, register_model
from cifar_resnet.models.blocks import BasicBlock, PreActBasicBlock, ZeroPadShortcut

MODELS_DIR = Path(__file__).resolve().parents[1] / "cifar_resnet" / "models"

# Exact counts for 10 classes: torchvision nets with CIFAR stem; He et al. 2015 Table 6 (option A,
# which rounds them: 0.27M ... 19.4M).
EXPECTED_PARAMS = {
    "resnet18": 11_173_962,
    "resnet34": 21_282_122,
    "resnet50": 23_520_842,
    "resnet101": 42_512_970,
    "resnet152": 58_156_618,
    "resnet20": 269_722,
    "resnet32": 464_154,
    "resnet44": 658_586,
    "resnet56": 853_018,
    "resnet110": 1_727_962,
    "resnet1202": 19_421_274,
}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def torchvision_cifar(name: str) -> ResNet:
    """torchvision's own resnet with the CIFAR stem swapped in by hand."""
    model = getattr(torchvision.models, name)(num_classes=10)
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def randomise_bn_stats_(model: nn.Module) -> nn.Module:
    """One train-mode forward so running stats differ from their defaults; returns eval-mode model."""
    with torch.no_grad():
        model.train()(torch.randn(4, 3, 32, 32))
    return model.eval()


# --- every registered model -------------------------------------------------------------------------


def test_registry_lists_every_family() -> None:
    names = list_models()
    assert names[:11] == ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
                          "resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet1202"]  # fmt: skip
    assert len(names) == len(set(names))
    assert set(EXPECTED_PARAMS) | {"preact_resnet18", "preact_resnet20", "preact_resnet56"} <= set(names)
    assert "preact_resnet110" in names


@pytest.mark.parametrize("num_classes", [10, 100])
@pytest.mark.parametrize("arch", list_models())
def test_forward_backward(arch: str, num_classes: int) -> None:
    torch.manual_seed(0)
    model = create_model(arch, num_classes=num_classes).train()
    head_out: list[torch.Tensor] = []
    model.fc.register_forward_hook(lambda _m, _i, out: head_out.append(out))
    x = torch.randn(2, 3, 32, 32)
    logits = model(x)
    assert logits.shape == (2, num_classes)
    assert torch.isfinite(logits).all()
    assert logits is head_out[0], "forward must return the raw linear-head logits"
    nn.functional.cross_entropy(logits, torch.tensor([0, num_classes - 1])).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name


# --- exact sizes ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("arch", "expected"), EXPECTED_PARAMS.items())
def test_exact_param_counts(arch: str, expected: int) -> None:
    assert n_params(create_model(arch)) == expected


def test_num_classes_changes_only_the_head() -> None:
    assert n_params(create_model("resnet20", num_classes=100)) == 269_722 + 90 * 65
    assert n_params(create_model("resnet50", num_classes=100)) == 23_520_842 + 90 * 2049


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_bad_num_classes(bad: object) -> None:
    with pytest.raises(ValueError, match="num_classes"):
        create_model("resnet20", num_classes=bad)  # type: ignore[arg-type]


# --- shortcuts --------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["resnet20", "resnet56", "preact_resnet20"])
def test_option_a_shortcuts_are_parameter_free(arch: str) -> None:
    model = create_model(arch)
    shortcuts = [m for m in model.modules() if isinstance(m, ZeroPadShortcut)]
    assert len(shortcuts) == 2  # 16->32 and 32->64
    assert all(n_params(s) == 0 for s in shortcuts)
    assert not any(isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) for m in model.modules())


def test_option_a_shortcut_subsamples_and_zero_pads() -> None:
    x = torch.randn(2, 16, 32, 32)
    y = ZeroPadShortcut(16, 32, stride=2)(x)
    assert y.shape == (2, 32, 16, 16)
    assert torch.equal(y[:, :16], x[:, :, ::2, ::2])
    assert not y[:, 16:].any()


def test_option_b_projects() -> None:
    plain_a, plain_b = create_model("resnet20"), create_model("resnet20", shortcut="B")
    # + conv1x1 16->32 & BN(32), conv1x1 32->64 & BN(64)
    assert n_params(plain_b) == n_params(plain_a) + (16 * 32 + 64) + (32 * 64 + 128) == 272_474
    assert not any(isinstance(m, ZeroPadShortcut) for m in plain_b.modules())
    assert n_params(create_model("preact_resnet56", shortcut="B")) > n_params(create_model("preact_resnet56"))


@pytest.mark.parametrize("bad", ["C", "a", "", None])
def test_bad_shortcut(bad: object) -> None:
    with pytest.raises(ValueError, match="'A', 'B'"):
        create_model("resnet20", shortcut=bad)


# --- torchvision equivalence ------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_is_torchvision_resnet_with_cifar_stem(arch: str) -> None:
    model = create_model(arch)
    assert isinstance(model, ResNet)
    conv1 = model.conv1
    assert (conv1.in_channels, conv1.out_channels, conv1.kernel_size) == (3, 64, (3, 3))
    assert (conv1.stride, conv1.padding, conv1.bias) == ((1, 1), (1, 1), None)
    assert isinstance(model.maxpool, nn.Identity)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_state_dict_round_trips_with_torchvision(arch: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)

    theirs = randomise_bn_stats_(torchvision_cifar(arch))
    ours = create_model(arch)
    ours.load_state_dict(theirs.state_dict())  # strict: identical keys and shapes
    ours.eval()
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x))

    ours = randomise_bn_stats_(create_model(arch))
    theirs = torchvision_cifar(arch)
    theirs.load_state_dict(ours.state_dict())
    theirs.eval()
    with torch.no_grad():
        assert torch.equal(theirs(x), ours(x))


# --- registry ---------------------------------------------------------------------------------------


def test_unknown_name_lists_known_names() -> None:
    with pytest.raises(ValueError, match="unknown model 'resnet19'") as err:
        create_model("resnet19")
    for name in list_models():
        assert name in str(err.value)


def test_duplicate_registration_raises() -> None:
    registry = ModelRegistry()

    def tiny(num_classes: int = 10) -> nn.Module:
        return nn.Linear(4, num_classes)

    registry.register(tiny)
    with pytest.raises(ValueError, match="already registered"):
        registry.register(tiny)
    assert registry.names() == ["tiny"]
    assert registry.create("tiny", num_classes=3).out_features == 3


def test_duplicate_registration_in_global_registry_raises() -> None:
    before = list_models()

    def resnet20(num_classes: int = 10) -> nn.Module:
        return nn.Linear(4, num_classes)

    with pytest.raises(ValueError, match="'resnet20' is already registered"):
        register_model(resnet20)
    assert list_models() == before
    assert not isinstance(create_model("resnet20"), nn.Linear)


def test_unexpected_kwarg_is_a_type_error() -> None:
    with pytest.raises(TypeError):
        create_model("resnet18", shortcut="A")


def test_models_package_imports_no_lightning_data_or_cli() -> None:
    banned = ("lightning", "pytorch_lightning", "torchmetrics", "argparse", "cifar_resnet.data")
    for path in MODELS_DIR.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""] if node.level == 0 else [f"cifar_resnet.{node.module or ''}"]
            else:
                continue
            for name in names:
                assert not name.startswith(banned), f"{path.name} imports {name}"
                if name.startswith("cifar_resnet."):
                    assert name.startswith("cifar_resnet.models") or node.level == 1, f"{path.name}: {name}"


# --- initialisation ---------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["resnet20", "resnet18", "preact_resnet20"])
def test_kaiming_init_and_unit_bn(arch: str) -> None:
    torch.manual_seed(0)
    model = create_model(arch)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms
    for bn in norms:
        assert torch.equal(bn.weight, torch.ones_like(bn.weight))
        assert torch.equal(bn.bias, torch.zeros_like(bn.bias))
    for name, conv in model.named_modules():
        if isinstance(conv, nn.Conv2d) and conv.weight.numel() >= 9_000:
            fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
            std = conv.weight.std().item()
            assert std == pytest.approx(math.sqrt(2.0 / fan_out), rel=0.05), name
            assert abs(conv.weight.mean().item()) < 0.1 * std, name


def test_zero_init_residual_torchvision_family() -> None:
    r18 = create_model("resnet18", zero_init_residual=True)
    r50 = create_model("resnet50", zero_init_residual=True)
    for model, last in ((r18, "bn2"), (r50, "bn3")):
        for name, m in model.named_modules():
            if isinstance(m, nn.BatchNorm2d):
                expected = 0.0 if name.endswith(last) else 1.0
                assert torch.all(m.weight == expected), name
    assert not torch.all(create_model("resnet18").layer1[0].bn2.weight == 0)


def test_zero_init_residual_cifar_family() -> None:
    model = create_model("resnet20", zero_init_residual=True).eval()
    blocks = [m for m in model.modules() if isinstance(m, BasicBlock)]
    assert len(blocks) == 9
    for block in blocks:
        assert not block.bn2.weight.any()
        assert torch.all(block.bn1.weight == 1)
    assert torch.all(model.stem.bn.weight == 1)
    x = torch.relu(torch.randn(2, 16, 32, 32))
    with torch.no_grad():
        assert torch.equal(model.layer1[1](x), x)  # an identity block at init


def test_zero_init_residual_preact_zeroes_last_conv() -> None:
    model = create_model("preact_resnet20", zero_init_residual=True).eval()
    blocks = [m for m in model.modules() if isinstance(m, PreActBasicBlock)]
    assert len(blocks) == 9
    assert all(not b.conv2.weight.any() and b.conv1.weight.any() for b in blocks)
    x = torch.randn(2, 16, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.layer1[1](x), x)


# --- pre-activation structure & norm_layer passthrough ----------------------------------------------


def test_preact_structure() -> None:
    model = create_model("preact_resnet20")
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.stem.modules())
    assert isinstance(model.final_act.bn, nn.BatchNorm2d)
    r18 = create_model("preact_resnet18")
    assert n_params(r18) == 11_172_170
    projections = [b.downsample for b in r18.modules() if isinstance(b, PreActBasicBlock) and b.downsample]
    assert len(projections) == 3
    assert all(isinstance(p, nn.Conv2d) and p.kernel_size == (1, 1) for p in projections)
    assert [w.shape[0] for w in (r18.layer1[0].conv1.weight, r18.layer4[1].conv2.weight)] == [64, 512]
    assert n_params(create_model("preact_resnet110")) == 1_727_962


@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "resnet20", "preact_resnet20"])
def test_norm_layer_passthrough(arch: str) -> None:
    model = create_model(arch, norm_layer=functools.partial(nn.GroupNorm, 8))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert any(isinstance(m, nn.GroupNorm) for m in model.modules())
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)
