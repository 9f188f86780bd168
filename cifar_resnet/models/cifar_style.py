"""The CIFAR ResNets of He et al. 2015 (sec. 4.2) and their pre-activation twins (He et al. 2016).

One network class, parametrised by block type, blocks per stage and stage widths:

* ``resnet{20,32,44,56,110,1202}``: 6n+2 layers; 3x3 conv stem with 16 channels, three stages of n
  BasicBlocks with 16/32/64 channels at 32/16/8 px, global average pool, linear head; option-A shortcuts.
* ``preact_resnet{20,56,110}``: the same with pre-activation blocks, plus a final BN-ReLU before pooling.
* ``preact_resnet{18,34}``: pre-activation blocks at ImageNet widths 64..512 (4 stages) on a 3x3 stem,
  with option-B (1x1 conv) shortcuts.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torchvision.models.resnet import conv3x3

from .blocks import (
    BasicBlock,
    CifarBlock,
    NormLayer,
    PreActBasicBlock,
    ShortcutKind,
    check_shortcut,
    make_shortcut,
)
from .registry import register_model

CIFAR_WIDTHS = (16, 32, 64)
IMAGENET_WIDTHS = (64, 128, 256, 512)


class CifarResNet(nn.Module):
    """stem -> ``layer1..layerK`` -> [final BN-ReLU for pre-activation] -> avgpool -> fc (logits).

    Stage ``i`` has ``layers[i]`` blocks of width ``widths[i]``; every stage after the first halves the
    resolution in its first block.
    """

    def __init__(
        self,
        block: CifarBlock,
        layers: Sequence[int],
        widths: Sequence[int] = CIFAR_WIDTHS,
        num_classes: int = 10,
        shortcut: ShortcutKind = "A",
        zero_init_residual: bool = False,
        norm_layer: NormLayer | None = None,
    ) -> None:
        super().__init__()
        if len(layers) != len(widths) or not layers:
            raise ValueError(f"need one width per stage, got layers={layers} widths={widths}")
        self.shortcut_kind = check_shortcut(shortcut)
        norm_layer = norm_layer or nn.BatchNorm2d
        self.block = block

        stem: OrderedDict[str, nn.Module] = OrderedDict(conv=conv3x3(3, widths[0]))
        if not block.preact:  # a pre-activation network normalises at the start of its first block
            stem.update(bn=norm_layer(widths[0]), relu=nn.ReLU(inplace=True))
        self.stem = nn.Sequential(stem)

        self.stage_names: tuple[str, ...] = tuple(f"layer{i + 1}" for i in range(len(layers)))
        in_planes = widths[0]
        for i, (name, num_blocks, width) in enumerate(zip(self.stage_names, layers, widths, strict=True)):
            stride = 1 if i == 0 else 2
            self.add_module(name, self._make_stage(in_planes, width, num_blocks, stride, norm_layer))
            in_planes = width

        self.final_act: nn.Module | None = None
        if block.preact:
            self.final_act = nn.Sequential(OrderedDict(bn=norm_layer(in_planes), relu=nn.ReLU(inplace=True)))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)

        init_weights_(self)
        if zero_init_residual:
            zero_init_residual_(self)

    def _make_stage(
        self, in_planes: int, planes: int, num_blocks: int, stride: int, norm_layer: NormLayer
    ) -> nn.Sequential:
        blocks = []
        for j in range(num_blocks):
            block_in, block_stride = (in_planes, stride) if j == 0 else (planes, 1)
            projection_norm = None if self.block.preact else norm_layer
            shortcut = make_shortcut(self.shortcut_kind, block_in, planes, block_stride, projection_norm)
            blocks.append(self.block(block_in, planes, block_stride, shortcut, norm_layer))
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for name in self.stage_names:
            x = getattr(self, name)(x)
        if self.final_act is not None:
            x = self.final_act(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def init_weights_(model: nn.Module) -> None:
    """torchvision's scheme: Kaiming-normal (fan_out, relu) convs, norm weight 1 / bias 0.

    Linear layers keep PyTorch's default init, as in torchvision.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d | nn.GroupNorm) and m.weight is not None:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def zero_init_residual_(model: nn.Module) -> None:
    """Start every residual block as the identity by zeroing the end of its residual branch.

    Goyal et al. 2017, "Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour", sec. 5.1: zero the
    last BN gamma of each residual branch (pre-activation blocks have no BN there: their last conv).
    """
    for m in model.modules():
        if isinstance(m, BasicBlock | PreActBasicBlock):
            m.zero_init_residual_()


@register_model
def resnet20(**kwargs: Any) -> CifarResNet:
    return CifarResNet(BasicBlock, (3, 3, 3), **kwargs)


@register_model
def resnet32(**kwargs: Any) -> CifarResNet:
    return CifarResNet(BasicBlock, (5, 5, 5), **kwargs)


@register_model
def resnet44(**kwargs: Any) -> CifarResNet:
    return CifarResNet(BasicBlock, (7, 7, 7), **kwargs)


@register_model
def resnet56(**kwargs: Any) -> CifarResNet:
    return CifarResNet(BasicBlock, (9, 9, 9), **kwargs)


@register_model
def resnet110(**kwargs: Any) -> CifarResNet:
    return CifarResNet(BasicBlock, (18, 18, 18), **kwargs)


@register_model
def resnet1202(**kwargs: Any) -> CifarResNet:
    return CifarResNet(BasicBlock, (200, 200, 200), **kwargs)


@register_model
def preact_resnet20(**kwargs: Any) -> CifarResNet:
    return CifarResNet(PreActBasicBlock, (3, 3, 3), **kwargs)


@register_model
def preact_resnet56(**kwargs: Any) -> CifarResNet:
    return CifarResNet(PreActBasicBlock, (9, 9, 9), **kwargs)


@register_model
def preact_resnet110(**kwargs: Any) -> CifarResNet:
    return CifarResNet(PreActBasicBlock, (18, 18, 18), **kwargs)


@register_model
def preact_resnet18(shortcut: ShortcutKind = "B", **kwargs: Any) -> CifarResNet:
    return CifarResNet(PreActBasicBlock, (2, 2, 2, 2), IMAGENET_WIDTHS, shortcut=shortcut, **kwargs)


@register_model
def preact_resnet34(shortcut: ShortcutKind = "B", **kwargs: Any) -> CifarResNet:
    return CifarResNet(PreActBasicBlock, (3, 4, 6, 3), IMAGENET_WIDTHS, shortcut=shortcut, **kwargs)
