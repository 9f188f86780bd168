"""Residual blocks and shortcuts for the CIFAR-style networks.

Shortcut options follow He et al. 2015, "Deep Residual Learning for Image Recognition", sec. 3.3:

* option ``"A"``: identity; where the shape changes, subsample by the stride and zero-pad the new channels
  (no parameters), as used for the CIFAR-10 networks of sec. 4.2;
* option ``"B"``: identity, but a 1x1 projection where the shape changes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet as tv_resnet

NormLayer = Callable[[int], nn.Module]
ShortcutKind = Literal["A", "B"]
SHORTCUT_KINDS: tuple[ShortcutKind, ...] = ("A", "B")


def check_shortcut(kind: str) -> ShortcutKind:
    """Return ``kind`` if it is a known shortcut option, else raise ``ValueError`` naming the options."""
    if kind not in SHORTCUT_KINDS:
        raise ValueError(f"shortcut must be one of {', '.join(map(repr, SHORTCUT_KINDS))}; got {kind!r}")
    return kind  # type: ignore[return-value]


class ZeroPadShortcut(nn.Module):
    """Option A: keep every ``stride``-th pixel and append zero channels up to ``out_planes``."""

    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        if out_planes < in_planes:
            raise ValueError(f"option-A shortcut cannot shrink channels ({in_planes} -> {out_planes})")
        self.in_planes, self.out_planes, self.stride = in_planes, out_planes, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.out_planes - self.in_planes))

    def extra_repr(self) -> str:
        return f"{self.in_planes}, {self.out_planes}, stride={self.stride}"


def make_shortcut(
    kind: ShortcutKind,
    in_planes: int,
    out_planes: int,
    stride: int,
    projection_norm: NormLayer | None,
) -> nn.Module | None:
    """The shortcut for a block, or ``None`` (pure identity) when the shape does not change.

    Option B projects with conv1x1 + ``projection_norm``, or a bare conv1x1 when that is ``None``
    (pre-activation blocks: their shortcut input is already normalised).
    """
    if stride == 1 and in_planes == out_planes:
        return None
    if kind == "A":
        return ZeroPadShortcut(in_planes, out_planes, stride)
    projection = tv_resnet.conv1x1(in_planes, out_planes, stride)
    if projection_norm is None:
        return projection
    return nn.Sequential(projection, projection_norm(out_planes))


class BasicBlock(tv_resnet.BasicBlock):
    """Post-activation block (He et al. 2015): relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)).

    torchvision's block; the shortcut module is passed as its ``downsample``.
    """

    preact: ClassVar[bool] = False

    def __init__(
        self,
        in_planes: int,
        planes: int,
        stride: int = 1,
        shortcut: nn.Module | None = None,
        norm_layer: NormLayer | None = None,
    ) -> None:
        super().__init__(in_planes, planes, stride=stride, downsample=shortcut, norm_layer=norm_layer)

    def zero_init_residual_(self) -> None:
        """Zero the last BN gamma, so the residual branch starts at 0 and the block at identity."""
        if self.bn2.weight is not None:
            nn.init.zeros_(self.bn2.weight)


class PreActBasicBlock(nn.Module):
    """Pre-activation block (He et al. 2016, "Identity Mappings in Deep Residual Networks").

    out = conv2(relu(bn2(conv1(relu(bn1(x)))))) + shortcut, with no activation after the addition.
    Where the shape changes, the shortcut reads the pre-activated input relu(bn1(x)) (as in the authors'
    fb.resnet.torch ``preresnet``); otherwise it is the untouched ``x``.
    """

    preact: ClassVar[bool] = True
    expansion: ClassVar[int] = 1

    def __init__(
        self,
        in_planes: int,
        planes: int,
        stride: int = 1,
        shortcut: nn.Module | None = None,
        norm_layer: NormLayer | None = None,
    ) -> None:
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm2d
        self.bn1 = norm_layer(in_planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv1 = tv_resnet.conv3x3(in_planes, planes, stride)
        self.bn2 = norm_layer(planes)
        self.conv2 = tv_resnet.conv3x3(planes, planes)
        self.downsample = shortcut
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(x))
        identity = x if self.downsample is None else self.downsample(out)
        out = self.conv1(out)
        out = self.conv2(self.relu(self.bn2(out)))
        return out + identity

    def zero_init_residual_(self) -> None:
        """No BN ends this branch, so zero the last conv instead: the branch outputs 0 and the block
        starts as the identity (conv2 still receives gradient, the layers before it do not at step 0)."""
        nn.init.zeros_(self.conv2.weight)


CifarBlock = type[BasicBlock] | type[PreActBasicBlock]
