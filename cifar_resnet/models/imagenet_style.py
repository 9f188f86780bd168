"""torchvision's ImageNet ResNets (18..152) with the usual CIFAR stem.

The network *is* ``torchvision.models.resnet.ResNet``; only the stem changes: the 7x7 stride-2 ``conv1``
becomes a 3x3 stride-1 conv and ``maxpool`` becomes ``nn.Identity``, so a 32x32 input reaches ``layer1``
at 32x32. Parameter names are torchvision's, so state dicts move both ways between our models and a
torchvision resnet given the same two replacements.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from .registry import register_model

NormLayer = Callable[[int], nn.Module]
TorchvisionBlock = type[BasicBlock] | type[Bottleneck]

STEM_CHANNELS = 64


def cifar_stem_(model: ResNet) -> ResNet:
    """In place: 3x3 stride-1 padding-1 ``conv1`` (3->64, no bias, Kaiming init) and no max-pool."""
    model.conv1 = nn.Conv2d(3, STEM_CHANNELS, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    model.maxpool = nn.Identity()
    return model


def cifar_torchvision_resnet(
    block: TorchvisionBlock,
    layers: Sequence[int],
    num_classes: int = 10,
    zero_init_residual: bool = False,
    norm_layer: NormLayer | None = None,
) -> ResNet:
    """A torchvision ``ResNet`` (Kaiming init, optional zero-init residual) with :func:`cifar_stem_`."""
    model = ResNet(
        block,
        list(layers),
        num_classes=num_classes,
        zero_init_residual=zero_init_residual,
        norm_layer=norm_layer,
    )
    return cifar_stem_(model)


@register_model
def resnet18(**kwargs: Any) -> ResNet:
    return cifar_torchvision_resnet(BasicBlock, (2, 2, 2, 2), **kwargs)


@register_model
def resnet34(**kwargs: Any) -> ResNet:
    return cifar_torchvision_resnet(BasicBlock, (3, 4, 6, 3), **kwargs)


@register_model
def resnet50(**kwargs: Any) -> ResNet:
    return cifar_torchvision_resnet(Bottleneck, (3, 4, 6, 3), **kwargs)


@register_model
def resnet101(**kwargs: Any) -> ResNet:
    return cifar_torchvision_resnet(Bottleneck, (3, 4, 23, 3), **kwargs)


@register_model
def resnet152(**kwargs: Any) -> ResNet:
    return cifar_torchvision_resnet(Bottleneck, (3, 8, 36, 3), **kwargs)
