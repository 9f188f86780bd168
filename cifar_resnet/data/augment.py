"""Batch augmentation: every sample gets its own random draw, the whole batch is transformed at once.

torchvision's transforms draw one set of random parameters per call, so per-sample randomness would
need one call per image (the PIL-pipeline bottleneck). These functions draw per-sample parameters from a
CPU generator (reproducible and independent of the device) and apply them with batched tensor ops on
whatever device holds the batch, so a GPU run augments on the GPU without worker processes.

Input is a uint8 batch ``(N, 3, H, W)``; output is a normalised float32 batch of the same shape.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cifar_resnet.data.policies import PolicyAugment

# ITU-R BT.601 luma weights, as torchvision's rgb_to_grayscale uses.
_LUMA = (0.299, 0.587, 0.114)


def to_device(host: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A tensor drawn on the host, on ``device``.

    A copy from pageable host memory to a GPU waits for the GPU to finish its queued work; from pinned
    memory it is asynchronous. So draws bound for a GPU are pinned first.
    """
    if device.type == "cuda":
        host = host.pin_memory()
    return host.to(device=device, dtype=dtype, non_blocking=True)


def _uniform(n: int, low: float, high: float, gen: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=gen) * (high - low) + low


def random_crop_and_flip(x: torch.Tensor, padding: int, flip_p: float, gen: torch.Generator) -> torch.Tensor:
    """Zero-pad by ``padding``, cut a crop of the original size at a per-sample random offset, and mirror
    it left-right with probability ``flip_p``.

    Both are one gather over flattened pixels: each sample reads the same index grid, shifted by its
    offset, with the columns reversed when it flips.
    """
    n, c, h, w = x.shape
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=gen)
    flip = (torch.rand(n, generator=gen) < flip_p).long()
    # Only the 3 draws per sample cross to the device, in one copy; the (n, h, w) index grid is built there.
    dy, dx, flip = to_device(torch.stack((dy, dx, flip)), x.device).unbind(0)
    padded_w = w + 2 * padding
    source = F.pad(x, (padding, padding, padding, padding)) if padding > 0 else x
    cols = torch.arange(w, device=x.device)
    cols = torch.where(flip[:, None].bool(), cols.flip(0), cols)  # (n, w)
    rows = torch.arange(h, device=x.device)[None, :, None] + dy[:, None, None]  # (n, h, 1)
    index = rows * padded_w + (cols + dx[:, None])[:, None, :]
    index = index.view(n, 1, h * w).expand(n, c, h * w)
    return source.flatten(2).gather(2, index).view(n, c, h, w)


def random_crop(x: torch.Tensor, padding: int, gen: torch.Generator) -> torch.Tensor:
    """Zero-pad by ``padding`` and cut a crop of the original size at a per-sample random offset."""
    return random_crop_and_flip(x, padding, 0.0, gen) if padding > 0 else x


def random_hflip(x: torch.Tensor, gen: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """Mirror each sample left-right with probability ``p``."""
    return random_crop_and_flip(x, 0, p, gen)


def random_resized_crop(
    x: torch.Tensor,
    gen: torch.Generator,
    scale: tuple[float, float] = (0.1, 1.0),
    ratio: tuple[float, float] = (0.5, 2.0),
) -> torch.Tensor:
    """Crop a per-sample random area fraction and aspect ratio and resize it back (bilinear).

    The crop's sides are clamped to the image instead of re-drawing, as torchvision does after 10 tries.
    """
    n, _, h, w = x.shape
    area = _uniform(n, *scale, gen)
    log_ratio = _uniform(n, math.log(ratio[0]), math.log(ratio[1]), gen)
    aspect = torch.exp(log_ratio)
    sx = torch.sqrt(area * aspect).clamp(max=1.0)  # crop width as a fraction of the image width
    sy = torch.sqrt(area / aspect).clamp(max=1.0)
    cx = (torch.rand(n, generator=gen) * 2 - 1) * (1 - sx)  # crop centre in [-1, 1] coordinates
    cy = (torch.rand(n, generator=gen) * 2 - 1) * (1 - sy)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sx, cx, sy, cy
    theta = to_device(theta, x.device, x.dtype)
    grid = F.affine_grid(theta, [n, x.shape[1], h, w], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _grayscale(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    return (_LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b).unsqueeze(1)


def _per_sample(values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return to_device(values, x.device, x.dtype).view(-1, 1, 1, 1)


def color_jitter(
    x: torch.Tensor, gen: torch.Generator, brightness: float, contrast: float, saturation: float, hue: float
) -> torch.Tensor:
    """Per-sample brightness, contrast, saturation and hue jitter of a float batch in [0, 1].

    Factors are drawn like torchvision's ColorJitter (``U(max(0, 1-b), 1+b)``, hue ``U(-h, h)`` of a turn) and
    applied in that fixed order. Hue is rotated in YIQ space, a per-sample-friendly stand-in for the HSV
    rotation torchvision uses (same hue turn, slightly different saturation handling).
    """
    n = x.shape[0]
    if brightness > 0:
        x = (x * _per_sample(_uniform(n, max(0.0, 1 - brightness), 1 + brightness, gen), x)).clamp(0, 1)
    if contrast > 0:
        mean = _grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
        c = _per_sample(_uniform(n, max(0.0, 1 - contrast), 1 + contrast, gen), x)
        x = (c * x + (1 - c) * mean).clamp(0, 1)
    if saturation > 0:
        s = _per_sample(_uniform(n, max(0.0, 1 - saturation), 1 + saturation, gen), x)
        x = (s * x + (1 - s) * _grayscale(x)).clamp(0, 1)
    if hue > 0:
        angle = _uniform(n, -hue, hue, gen) * 2 * math.pi
        to_yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
        rot = torch.zeros(n, 3, 3)
        rot[:, 0, 0] = 1
        rot[:, 1, 1], rot[:, 1, 2] = torch.cos(angle), -torch.sin(angle)
        rot[:, 2, 1], rot[:, 2, 2] = torch.sin(angle), torch.cos(angle)
        mix = to_device(torch.linalg.inv(to_yiq) @ rot @ to_yiq, x.device, x.dtype)
        x = torch.einsum("nij,njhw->nihw", mix, x).clamp(0, 1)
    return x


def cutout(x: torch.Tensor, size: int, gen: torch.Generator) -> torch.Tensor:
    """Zero a ``size``×``size`` square at a per-sample random centre, clipped at the borders.

    DeVries & Taylor 2017, "Improved Regularization of Convolutional Neural Networks with Cutout".
    """
    if size <= 0:
        return x
    n, _, h, w = x.shape
    cy = torch.randint(0, h, (n, 1), generator=gen)
    cx = torch.randint(0, w, (n, 1), generator=gen)
    cy, cx = to_device(torch.stack((cy, cx)), x.device).unbind(0)
    ys = torch.arange(h, device=x.device)[None, :]
    xs = torch.arange(w, device=x.device)[None, :]
    in_rows = (ys >= cy - size // 2) & (ys < cy - size // 2 + size)
    in_cols = (xs >= cx - size // 2) & (xs < cx - size // 2 + size)
    hole = in_rows[:, None, :, None] & in_cols[:, None, None, :]
    return x.masked_fill(hole, 0.0)


class Normalize(torch.nn.Module):
    """uint8 ``(N, 3, H, W)`` in [0, 255] to float32, then per-channel ``(x - mean) / std``.

    The constants are copied to a batch's device once and kept there: the DataModule that owns this module
    is no ``nn.Module``, so nothing moves its buffers, and copying them for every batch would make every
    batch wait for the GPU.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self._on_device: dict[torch.device, tuple[torch.Tensor, ...]] = {}

    def _constants(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``mean``, ``std``, and the uint8 multiply-add's scale and shift, on ``device``."""
        if device not in self._on_device:
            host = torch.stack((self.mean, self.std, 1.0 / (255.0 * self.std), -self.mean / self.std))
            self._on_device[device] = tuple(to_device(host, device).unbind(0))
        mean, std, scale, shift = self._on_device[device]
        return mean, std, scale, shift

    def to_unit(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 in [0, 255] to float32 in [0, 1]."""
        return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Float in [0, 1] to normalised."""
        mean, std, _, _ = self._constants(x.device)
        return (x - mean) / std

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Back to [0, 1] for display."""
        mean, std, _, _ = self._constants(x.device)
        return (x * std + mean).clamp(0, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 in [0, 255] or float in [0, 1] to normalised float32."""
        if x.dtype != torch.uint8:
            return self.normalize(x.float())
        # (x / 255 - mean) / std as one multiply-add that reads uint8 and writes float32.
        _, _, scale, shift = self._constants(x.device)
        return torch.addcmul(shift, x, scale)


@dataclass(frozen=True)
class AugmentConfig:
    """Which augmentations run, in the order they are applied."""

    random_resized_crop: bool = False
    rrc_scale: tuple[float, float] = (0.1, 1.0)
    rrc_ratio: tuple[float, float] = (0.5, 2.0)
    crop_padding: int = 4
    hflip: bool = True
    color_jitter: tuple[float, float, float, float] | None = None  # brightness, contrast, saturation, hue
    cutout: int = 0  # side of the zeroed square in pixels; 0 is off
    policy: str = "none"  # none, autoaugment, randaugment or trivialaugment
    randaugment_num_ops: int = 2
    randaugment_magnitude: int = 9

    def policy_augment(self) -> PolicyAugment | None:
        """The per-image policy, or None. Geometric ops fill with 0, as the crop's padding and torchvision do."""
        if self.policy == "none":
            return None
        return PolicyAugment(self.policy, fill=0, num_ops=self.randaugment_num_ops,  # type: ignore[arg-type]
                             magnitude=self.randaugment_magnitude)  # fmt: skip

    def describe(self) -> str:
        parts = []
        if self.random_resized_crop:
            parts.append(f"random resized crop (scale {self.rrc_scale}, ratio {self.rrc_ratio})")
        if self.crop_padding:
            parts.append(f"random crop with {self.crop_padding}-pixel padding")
        if self.hflip:
            parts.append("horizontal flip")
        policy = self.policy_augment()
        if policy is not None:
            parts.append(policy.describe())
        if self.color_jitter:
            parts.append(f"colour jitter (b, c, s, h) = {self.color_jitter}")
        if self.cutout:
            parts.append(f"cutout {self.cutout}x{self.cutout}")
        return ", ".join(parts) or "none"


class BatchAugment(torch.nn.Module):
    """The training transform: per-sample random augmentation of a uint8 batch, then normalisation.

    The order is (random resized crop), crop and flip, the policy, (colour jitter), normalisation, cutout:
    torchvision's and timm's CIFAR/ImageNet recipes put AutoAugment/RandAugment/TrivialAugment after the
    crop and flip and before the tensor conversion, with Cutout / random erasing last, and the AutoAugment
    paper (Cubuk et al. 2019, appendix) applies "the baseline augmentation, then the policy, then Cutout".
    (Its TensorFlow code runs the policy before pad-crop-flip; the two differ only in whether the policy
    sees the crop's zero border.) Cutout zeroes normalised pixels, i.e. fills with the data mean, as the
    Cutout paper's code does. Every draw comes from ``gen``, in this order.
    """

    def __init__(self, config: AugmentConfig, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.config = config
        self.norm = Normalize(mean, std)
        self.policy = config.policy_augment()

    def forward(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        cfg = self.config
        if cfg.random_resized_crop:
            x = random_resized_crop(self.norm.to_unit(x), gen, cfg.rrc_scale, cfg.rrc_ratio)
            if self.policy is not None:  # the policy's ops are defined on uint8 pixels
                x = x.mul(255.0).round_().clamp_(0, 255).to(torch.uint8)
        # Crop and flip only move pixels: on uint8 they touch a quarter of the bytes of float32.
        if cfg.crop_padding > 0 or cfg.hflip:
            x = random_crop_and_flip(x, cfg.crop_padding, 0.5 if cfg.hflip else 0.0, gen)
        if self.policy is not None:
            x = self.policy(x, gen)
        if cfg.color_jitter:
            x = self.norm.normalize(color_jitter(self.norm.to_unit(x), gen, *cfg.color_jitter))
        else:
            x = self.norm(x)
        return cutout(x, cfg.cutout, gen)
