"""Per-sample policy augmentation (AutoAugment, RandAugment, TrivialAugmentWide) and batch MixUp / CutMix.

torchvision's v2 ``AutoAugment``, ``RandAugment`` and ``TrivialAugmentWide`` draw one op per call from the
global RNG, so a batch passed through them gets the same op for every image; per image they run at ~6,000
to 8,000 images/s in a Python loop. Kornia's ``kornia.augmentation.auto`` policies (0.9.0) also pick one
sub-policy per call for the whole batch (only magnitudes vary per row), also draw from the global RNG (no
generator argument), work on float images and use their own magnitude scales. Measured on this project's
2-core CPU (median of 9 interleaved rounds of 20 calls; kornia on float [0, 1] input, ours on uint8),
images/s at batch 128 / 512:

    ========================  ================  ================
    policy                    kornia 0.9.0      this module
    ========================  ================  ================
    AutoAugment (CIFAR-10)    29,000 / 32,000   48,000 / 88,000
    RandAugment (2 ops, m=9)  34,000 / 43,000   39,000 / 62,000
    TrivialAugment(Wide)      68,000 / 79,000   68,000 / 119,000
    ========================  ================  ================

Kornia gives neither per-image op choices nor a seedable draw, and is no faster, so the policies are our own.
Ops, magnitude tables and the signed-magnitude rule follow torchvision's implementation, and every op
gives torchvision's pixels exactly on the CPU (checked against ``torchvision.transforms.v2.functional``
in the tests).

Every random choice is drawn from a CPU ``torch.Generator`` by :meth:`PolicyAugment.draw` into a
:class:`PolicyPlan`, so the draws are reproducible and the same on every device; :meth:`PolicyAugment.apply`
then runs the plan with batched tensor ops on whatever device holds the batch, without reading anything back
from it (no ``.item()``, ``nonzero`` or data-dependent shapes on the device).

MixUp / CutMix (:func:`mix_batch`) draw one λ per batch, as the papers and torchvision's v2 ``MixUp`` /
``CutMix`` do. Those two transforms draw from the global RNG (``torch.distributions.Beta.sample`` and
``torch.randint``) and take no generator, so the few lines of mixing are written here too (and run 1.4-2x
faster than theirs: 1.2M / 1.7M images/s for MixUp and 0.7M / 1.2M for CutMix at batch 128 / 512).
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

Policy = Literal["autoaugment", "randaugment", "trivialaugment"]

# Every op the policies use; a plan stores indices into this tuple. The geometric ops are contiguous so that
# one affine warp serves all of them.
OP_NAMES = (
    "Identity",
    "ShearX",
    "ShearY",
    "TranslateX",
    "TranslateY",
    "Rotate",
    "Brightness",
    "Color",
    "Contrast",
    "Sharpness",
    "Posterize",
    "Solarize",
    "AutoContrast",
    "Equalize",
    "Invert",
)
_OP = {name: index for index, name in enumerate(OP_NAMES)}
_GEOMETRIC = range(_OP["ShearX"], _OP["Rotate"] + 1)
_SIGNED = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color", "Contrast", "Sharpness")
# RandAugment and TrivialAugmentWide choose uniformly among these (torchvision's list: Identity, no Invert).
_RANDOM_OPS = tuple(name for name in OP_NAMES if name != "Invert")

# AutoAugment's CIFAR-10 policy (Cubuk et al. 2019, "AutoAugment: Learning Augmentation Strategies from Data",
# as torchvision lists it): (op, probability, magnitude bin of 10) pairs; None where the op has no magnitude.
AUTOAUGMENT_CIFAR10 = (
    (("Invert", 0.1, None), ("Contrast", 0.2, 6)),
    (("Rotate", 0.7, 2), ("TranslateX", 0.3, 9)),
    (("Sharpness", 0.8, 1), ("Sharpness", 0.9, 3)),
    (("ShearY", 0.5, 8), ("TranslateY", 0.7, 9)),
    (("AutoContrast", 0.5, None), ("Equalize", 0.9, None)),
    (("ShearY", 0.2, 7), ("Posterize", 0.3, 7)),
    (("Color", 0.4, 3), ("Brightness", 0.6, 7)),
    (("Sharpness", 0.3, 9), ("Brightness", 0.7, 9)),
    (("Equalize", 0.6, None), ("Equalize", 0.5, None)),
    (("Contrast", 0.6, 7), ("Sharpness", 0.6, 5)),
    (("Color", 0.7, 7), ("TranslateX", 0.5, 8)),
    (("Equalize", 0.3, None), ("AutoContrast", 0.4, None)),
    (("TranslateY", 0.4, 3), ("Sharpness", 0.2, 6)),
    (("Brightness", 0.9, 6), ("Color", 0.2, 8)),
    (("Solarize", 0.5, 2), ("Invert", 0.0, None)),
    (("Equalize", 0.2, None), ("AutoContrast", 0.6, None)),
    (("Equalize", 0.2, None), ("Equalize", 0.6, None)),
    (("Color", 0.9, 9), ("Equalize", 0.6, None)),
    (("AutoContrast", 0.8, None), ("Solarize", 0.2, 8)),
    (("Brightness", 0.1, 3), ("Color", 0.7, 0)),
    (("Solarize", 0.4, 5), ("AutoContrast", 0.9, None)),
    (("TranslateY", 0.9, 9), ("TranslateY", 0.7, 9)),
    (("AutoContrast", 0.9, None), ("Solarize", 0.8, 3)),
    (("Equalize", 0.8, None), ("Invert", 0.1, None)),
    (("TranslateY", 0.7, 9), ("AutoContrast", 0.9, None)),
)
_AUTOAUGMENT_BINS = 10

# rgb_to_grayscale weights of torchvision's tensor kernels (they sum to 0.9999, as there).
_GREY_WEIGHTS = (0.2989, 0.587, 0.114)


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device``: through pinned memory and without blocking the host on CUDA."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


@functools.lru_cache(maxsize=32)
def magnitude_table(wide: bool, num_bins: int, height: int, width: int) -> torch.Tensor:
    """``(len(OP_NAMES), num_bins)`` float64 magnitude per op and bin; 0 for ops without a magnitude.

    ``wide`` selects TrivialAugmentWide's ranges, otherwise AutoAugment's and RandAugment's. The ramps are
    float32 ``linspace`` values, as torchvision's tables are.
    """
    table = torch.zeros(len(OP_NAMES), num_bins, dtype=torch.float64)

    def ramp(top: float) -> torch.Tensor:
        return torch.linspace(0.0, top, num_bins).double()

    for name in ("ShearX", "ShearY"):
        table[_OP[name]] = ramp(0.99 if wide else 0.3)
    table[_OP["TranslateX"]] = ramp(32.0 if wide else 150.0 / 331.0 * width)
    table[_OP["TranslateY"]] = ramp(32.0 if wide else 150.0 / 331.0 * height)
    table[_OP["Rotate"]] = ramp(135.0 if wide else 30.0)
    for name in ("Brightness", "Color", "Contrast", "Sharpness"):
        table[_OP[name]] = ramp(0.99 if wide else 0.9)
    bits_dropped = 6.0 if wide else 4.0  # posterize keeps 8 bits at bin 0, 8 - bits_dropped at the last bin
    table[_OP["Posterize"]] = (8 - torch.arange(num_bins) * (bits_dropped / (num_bins - 1))).round().double()
    table[_OP["Solarize"]] = torch.linspace(1.0, 0.0, num_bins).double()
    return table


def _signed_magnitudes(
    ops: torch.Tensor, bins: torch.Tensor, negate: torch.Tensor, wide: bool, num_bins: int, height: int, width: int
) -> torch.Tensor:
    """float64 magnitude of each op at its bin, negated where ``negate`` is set and the op is signed."""
    signed = torch.tensor([name in _SIGNED for name in OP_NAMES])
    sign = torch.where(negate & signed[ops], -1.0, 1.0).double()
    return magnitude_table(wide, num_bins, height, width)[ops, bins] * sign


@functools.lru_cache(maxsize=32)
def _parameter_table(wide: bool, num_bins: int, height: int, width: int) -> torch.Tensor:
    """``(len(OP_NAMES), num_bins, 2, 6)`` float32 kernel parameters of every op, bin and sign (1: negated).

    Geometric ops: the inverse affine matrix (output pixel to input pixel, pixel-centred coordinates)
    divided by the half sizes, i.e. in grid_sample's [-1, 1] units. Brightness, Color, Contrast, Sharpness:
    factor and 1 - factor. Posterize: the bit mask. Solarize: the threshold. A plan's parameters are one
    lookup in this table, so the host does no per-batch arithmetic.
    """
    shape = (len(OP_NAMES), num_bins, 2)
    ops = torch.arange(shape[0]).view(-1, 1, 1).expand(shape)
    bins = torch.arange(num_bins).view(1, -1, 1).expand(shape)
    negate = torch.tensor([False, True]).view(1, 1, 2).expand(shape)
    m = _signed_magnitudes(ops, bins, negate, wide, num_bins, height, width)

    def where(name: str, value: torch.Tensor | float, other: torch.Tensor) -> torch.Tensor:
        return torch.where(ops == _OP[name], value, other)

    zero, one = torch.zeros_like(m), torch.ones_like(m)
    # Rotate: torchvision rotates counter-clockwise by m degrees about the centre, after m % 360.
    angle = m.remainder(360.0) * (math.pi / 180.0)
    cos, sin = torch.cos(angle), torch.sin(angle)
    a = where("Rotate", cos, one)
    b = where("Rotate", -sin, where("ShearX", m, zero))
    c = where("TranslateX", -m.trunc(), where("ShearX", m * (height / 2), zero))  # translate by int(m) pixels
    d = where("Rotate", sin, where("ShearY", m, zero))
    e = where("Rotate", cos, one)
    f = where("TranslateY", -m.trunc(), where("ShearY", m * (width / 2), zero))  # shears fix the top-left corner
    geometric = torch.cat([torch.stack([a, b, c], -1) / (width / 2), torch.stack([d, e, f], -1) / (height / 2)], -1)

    factor = 1.0 + m
    bits = m.to(torch.int64).clamp(0, 8)
    posterize_mask = ((1 << bits) - 1) << (8 - bits)
    first = where("Posterize", posterize_mask.double(), where("Solarize", 255.0 * m, factor))
    rest = torch.stack([first, 1.0 - factor, zero, zero, zero, zero], -1)
    is_geometric = ((ops >= _GEOMETRIC.start) & (ops < _GEOMETRIC.stop))[..., None]
    return torch.where(is_geometric, geometric, rest).float()


@dataclass(frozen=True)
class PolicyPlan:
    """The random draws for one batch: per layer and sample, which op runs with which magnitude bin.

    ``ops``, ``bins`` and ``negate`` are ``(layers, n)`` CPU tensors; a layer that leaves a sample alone
    (an AutoAugment op skipped by its probability) holds Identity. ``negate`` flips the magnitude of the
    signed ops. ``sub_policies`` is AutoAugment's sub-policy index per sample, None for the other policies.
    """

    ops: torch.Tensor
    bins: torch.Tensor
    negate: torch.Tensor
    sub_policies: torch.Tensor | None = None


class PolicyAugment:
    """AutoAugment (CIFAR-10 policy), RandAugment or TrivialAugmentWide with a random op per image.

    Input and output are uint8 ``(N, 3, H, W)`` batches on any device; BatchAugment applies it after crop and
    flip, before normalisation. ``fill`` is the value of pixels that geometric ops move in from outside the image.
    ``num_ops``, ``magnitude`` and ``num_magnitude_bins`` are RandAugment's; TrivialAugmentWide uses
    ``num_magnitude_bins`` too; AutoAugment's policy fixes its own.
    """

    def __init__(
        self,
        policy: Policy,
        fill: int = 0,
        num_ops: int = 2,
        magnitude: int = 9,
        num_magnitude_bins: int = 31,
    ) -> None:
        if policy not in ("autoaugment", "randaugment", "trivialaugment"):
            raise ValueError(f"unknown policy {policy!r}: use autoaugment, randaugment or trivialaugment")
        if not 0 <= fill <= 255:
            raise ValueError(f"fill {fill} is not a uint8 value")
        if num_ops < 0:
            raise ValueError(f"num_ops must be non-negative, got {num_ops}")
        if num_magnitude_bins < 2:
            raise ValueError(f"num_magnitude_bins must be at least 2, got {num_magnitude_bins}")
        if policy == "randaugment" and not 0 <= magnitude < num_magnitude_bins:
            raise ValueError(f"magnitude {magnitude} is not a bin of {num_magnitude_bins}")
        self.policy = policy
        self.fill = fill
        self.num_ops = num_ops
        self.magnitude = magnitude
        self.num_magnitude_bins = num_magnitude_bins

    @property
    def num_bins(self) -> int:
        """Bins of the magnitude table the plan's ``bins`` index."""
        return _AUTOAUGMENT_BINS if self.policy == "autoaugment" else self.num_magnitude_bins

    @property
    def wide(self) -> bool:
        return self.policy == "trivialaugment"

    def describe(self) -> str:
        if self.policy == "autoaugment":
            text = f"AutoAugment (CIFAR-10 policy, {len(AUTOAUGMENT_CIFAR10)} sub-policies)"
        elif self.policy == "randaugment":
            text = f"RandAugment ({self.num_ops} ops, magnitude {self.magnitude} of {self.num_magnitude_bins} bins)"
        else:
            text = f"TrivialAugmentWide ({self.num_magnitude_bins} magnitude bins)"
        return f"{text}, op drawn per image, fill {self.fill}"

    # ------------------------------------------------------------------ drawing (host only)

    def draw(self, n: int, gen: torch.Generator) -> PolicyPlan:
        """Each of ``n`` images' op choices and magnitude bins, drawn from the CPU generator ``gen``."""
        if self.policy == "autoaugment":
            return self._draw_autoaugment(n, gen)
        layers = 1 if self.policy == "trivialaugment" else self.num_ops
        random_ops = torch.tensor([_OP[name] for name in _RANDOM_OPS])
        ops = random_ops[torch.randint(len(random_ops), (layers, n), generator=gen)]
        if self.policy == "trivialaugment":
            bins = torch.randint(self.num_magnitude_bins, (layers, n), generator=gen)
        else:
            bins = torch.full((layers, n), self.magnitude)
        negate = torch.rand(layers, n, generator=gen) <= 0.5  # torchvision's rule: negative when rand <= 0.5
        return PolicyPlan(ops, bins, negate)

    def _draw_autoaugment(self, n: int, gen: torch.Generator) -> PolicyPlan:
        entry_ops = torch.tensor([[_OP[op] for op, _, _ in pair] for pair in AUTOAUGMENT_CIFAR10]).T  # (2, 25)
        entry_probs = torch.tensor([[p for _, p, _ in pair] for pair in AUTOAUGMENT_CIFAR10]).T
        entry_bins = torch.tensor([[b or 0 for _, _, b in pair] for pair in AUTOAUGMENT_CIFAR10]).T
        sub_policies = torch.randint(len(AUTOAUGMENT_CIFAR10), (n,), generator=gen)
        applied = torch.rand(2, n, generator=gen) <= entry_probs[:, sub_policies]
        ops = torch.where(applied, entry_ops[:, sub_policies], _OP["Identity"])
        negate = torch.rand(2, n, generator=gen) <= 0.5
        return PolicyPlan(ops, entry_bins[:, sub_policies], negate, sub_policies)

    def magnitudes(self, plan: PolicyPlan, height: int, width: int) -> torch.Tensor:
        """``(layers, n)`` float64 signed magnitude of each planned op, in torchvision's units."""
        return _signed_magnitudes(plan.ops, plan.bins, plan.negate, self.wide, self.num_bins, height, width)

    # ------------------------------------------------------------------ applying (on the batch's device)

    def __call__(self, images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Draw a plan for ``images`` from ``gen`` and apply it."""
        return self.apply(images, self.draw(images.shape[0], gen))

    def apply(self, images: torch.Tensor, plan: PolicyPlan) -> torch.Tensor:
        """Run ``plan`` on a uint8 ``(N, 3, H, W)`` batch; returns a new uint8 batch on the same device.

        Per layer, the samples are sorted by their op so that every op runs once, on a contiguous slice of
        the sorted batch holding exactly the samples that chose it (all five geometric ops share one affine
        warp). Each sample is processed by one op per layer: running every op over the whole batch with
        identity parameters where unchosen is 6x slower (TrivialAugmentWide at batch 512 on the CPU: 27 ms
        against 4.3 ms), and per-op index_select / index_copy would add two copies per op instead of one
        gather per layer. The order, the slice bounds and the parameters are computed on the host from the
        plan and reach the device in two transfers per call; slicing with host integers reads nothing back.
        """
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected a uint8 (N, 3, H, W) batch, got {images.dtype} {tuple(images.shape)}")
        n, _, height, width = images.shape
        layers = plan.ops.shape[0]
        if n == 0 or layers == 0:
            return images.clone()
        if plan.ops.shape[1] != n:
            raise ValueError(f"the plan is for {plan.ops.shape[1]} images, the batch has {n}")

        orders = torch.argsort(plan.ops, dim=1, stable=True)  # (layers, n): sample ids grouped by op
        counts = _op_counts(plan)
        table = _parameter_table(self.wide, self.num_bins, height, width)
        params = table[plan.ops.gather(1, orders), plan.bins.gather(1, orders), plan.negate.gather(1, orders).long()]
        # Gather indices: from the original order into layer 0's, from each layer's order into the next's,
        # and finally back to the original order.
        arrangement = torch.arange(n)
        gathers = []
        for order in [*orders, torch.arange(n)]:
            gathers.append(_inverse_permutation(arrangement)[order])
            arrangement = order
        gathers = _to_device(torch.stack(gathers), images.device)
        params = _to_device(params, images.device)

        x = images
        for layer in range(layers):
            x = x.index_select(0, gathers[layer])
            pieces = []
            start = 0
            for op, count in _segments(counts[layer]):
                if count:
                    pieces.append(self._run_op(op, x[start : start + count], params[layer, start : start + count]))
                start += count
            x = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
        return x.index_select(0, gathers[layers])

    def _run_op(self, op: int, x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """One op on the slice ``x`` of the samples that chose it, with their parameter rows ``p``."""
        name = OP_NAMES[op]
        column = p[:, 0].view(-1, 1, 1, 1)
        if name == "Identity":
            return x
        if name == "ShearX":  # stands for all geometric ops, see _segments
            return affine_warp(x, p.view(-1, 2, 3), self.fill)
        if name == "Brightness":
            return x.float().mul_(column).clamp_(0, 255).to(torch.uint8)
        if name == "Color":
            return _blend(x, grayscale(x).floor_(), column, p[:, 1].view(-1, 1, 1, 1))
        if name == "Contrast":
            mean = grayscale(x).floor_().mean(dim=(-3, -2, -1), keepdim=True)
            return _blend(x, mean, column, p[:, 1].view(-1, 1, 1, 1))
        if name == "Sharpness":
            return _sharpen(x, p[:, 1].view(-1, 1, 1, 1))
        if name == "Posterize":
            return x.bitwise_and(column.to(torch.uint8))
        if name == "Solarize":
            return torch.where(x >= column, 255 - x, x)
        if name == "AutoContrast":
            return autocontrast(x)
        if name == "Equalize":
            return equalize(x)
        if name == "Invert":
            return 255 - x
        raise AssertionError(f"no kernel for {name}")


def _op_counts(plan: PolicyPlan) -> list[list[int]]:
    """Per layer, how many samples chose each op: read from the plan's host tensors, never from the batch."""
    return [torch.bincount(row, minlength=len(OP_NAMES)).tolist() for row in plan.ops]


def _segments(counts: list[int]) -> list[tuple[int, int]]:
    """``(op, count)`` runs in op order, with the geometric ops merged into one run under ShearX."""
    runs = [(op, count) for op, count in enumerate(counts) if op not in _GEOMETRIC]
    geometric = sum(counts[op] for op in _GEOMETRIC)
    runs.insert(_GEOMETRIC.start, (_GEOMETRIC.start, geometric))
    return runs


def _inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(len(perm))
    return inverse


# ---------------------------------------------------------------------- batched ops (uint8 in, uint8 out)


def _pixel_centres(height: int, width: int, device: torch.device) -> torch.Tensor:
    """``(H*W, 2)`` (x, y) of every pixel centre, row by row, with the image centre at (0, 0)."""
    xs = torch.arange(width, device=device, dtype=torch.float32) - (width - 1) / 2
    ys = torch.arange(height, device=device, dtype=torch.float32) - (height - 1) / 2
    return torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1).view(-1, 2)


def affine_warp(x: torch.Tensor, theta: torch.Tensor, fill: int = 0) -> torch.Tensor:
    """Nearest-neighbour warp of each image by its own ``(2, 3)`` inverse matrix; outside pixels get ``fill``.

    ``theta`` maps pixel-centred output coordinates to input coordinates divided by the half sizes, the units
    of ``grid_sample`` with ``align_corners=False``. The grid is built in pixel units and scaled by ``theta``
    (``affine_grid`` starts from [-1, 1] units), which reproduces torchvision's sampling positions to the last
    bit; written as broadcast multiply-adds it is 10x faster on the CPU than a batched matmul with K = 3.
    """
    n, _, h, w = x.shape
    centres = _pixel_centres(h, w, x.device)
    grid = centres[:, 0, None] * theta[:, None, :, 0] + centres[:, 1, None] * theta[:, None, :, 1]
    grid = (grid + theta[:, None, :, 2]).view(n, h, w, 2)
    source = x.float()
    if fill:
        # Sampling x - fill with zero padding and adding fill back puts fill outside and x (exactly) inside.
        source = source.sub_(fill)
    warped = F.grid_sample(source, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    if fill:
        warped = warped.add_(fill)
    return warped.to(torch.uint8)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """``(N, 1, H, W)`` float32 luma of a uint8 RGB batch, with torchvision's weights and rounding order."""
    r, g, b = x.unbind(1)
    return r.mul(_GREY_WEIGHTS[0]).add_(g, alpha=_GREY_WEIGHTS[1]).add_(b, alpha=_GREY_WEIGHTS[2]).unsqueeze(1)


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor, one_minus_factor: torch.Tensor) -> torch.Tensor:
    """``factor * x + (1 - factor) * other``, clamped and truncated to uint8 like torchvision's blend.

    torchvision adds the second term with ``add_(other, alpha=1 - factor)``, one fused multiply-add per pixel
    on the CPU; ``addcmul`` is its per-sample-factor counterpart and rounds the same way (a separate multiply
    and add leaves 1-5% of the pixels one level lower where the exact result is an integer).
    """
    return torch.addcmul(x.float().mul_(factor), other, one_minus_factor).clamp_(0, 255).to(torch.uint8)


def _sharpen(x: torch.Tensor, one_minus_factor: torch.Tensor) -> torch.Tensor:
    """torchvision's adjust_sharpness per sample: blend with a 3x3 smoothing of the interior pixels.

    The smoothing is (3x3 sum + 4 * centre) / 13, rounded; border pixels keep their value. A factor of 1
    leaves the image, 0 gives the smoothed one; ``1 - factor`` comes precomputed (in float64, as there).
    The 3x3 sums are exact integers from shifted slices, 4x faster on the CPU than a grouped conv2d.
    """
    out = x.float()
    rows = out[..., :-2, :] + out[..., 1:-1, :] + out[..., 2:, :]
    interior = out[..., 1:-1, 1:-1]
    smoothed = (rows[..., :-2] + rows[..., 1:-1] + rows[..., 2:]).add_(interior, alpha=4).div_(13).round_()
    interior.addcmul_(smoothed.sub_(interior), one_minus_factor)
    return out.clamp_(0, 255).to(torch.uint8)


def autocontrast(x: torch.Tensor) -> torch.Tensor:
    """Stretch each channel of each image to [0, 255]; flat channels stay as they are."""
    pixels = x.float()
    low = pixels.amin(dim=(-2, -1), keepdim=True)
    high = pixels.amax(dim=(-2, -1), keepdim=True)
    flat = high == low
    step = torch.where(flat, 1.0, (high - low) * (1.0 / 255.0))  # the input range of one output level
    low = torch.where(flat, 0.0, low)
    return pixels.sub_(low).div_(step).clamp_(0, 255).to(torch.uint8)


def equalize(x: torch.Tensor) -> torch.Tensor:
    """Histogram-equalise each channel of each image with PIL's rule, from one batched histogram.

    PIL spreads the pixels below a channel's top value evenly over 256 levels: ``step`` is their count over
    255 and value v maps to ``(pixels below v + step // 2) // step``. A channel with ``step`` 0 is unchanged.
    """
    n, c, h, w = x.shape
    values = x.reshape(n, c, h * w).long()
    hist = torch.zeros(n, c, 256, dtype=torch.int64, device=x.device)
    hist.scatter_add_(2, values, torch.ones_like(values))
    top_count = hist.gather(2, values.amax(dim=2, keepdim=True))
    step = (h * w - top_count) // 255
    below = hist.cumsum(2) - hist  # pixels strictly below each value
    lut = ((below + step // 2) // step.clamp(min=1)).clamp_(max=255)
    equalized = lut.gather(2, values).view(n, c, h, w).to(torch.uint8)
    return torch.where((step > 0).view(n, c, 1, 1), equalized, x)


# ---------------------------------------------------------------------- MixUp and CutMix


@dataclass(frozen=True)
class MixPlan:
    """One batch's mix: ``lam`` is the weight of each image's own label (for CutMix the area it keeps);
    ``box`` is CutMix's ``(top, bottom, left, right)`` region pasted from the partner, None for MixUp."""

    kind: Literal["mixup", "cutmix", "none"]
    lam: float
    box: tuple[int, int, int, int] | None = None


def _log_gamma_sample(shape: float, gen: torch.Generator) -> float:
    """log of a Gamma(shape, 1) draw from ``gen`` (Marsaglia & Tsang 2000; shape < 1 boosted by U^(1/shape)).

    Works in logs so that tiny shapes (U^(1/shape) underflowing) still give a usable Beta ratio.
    """
    boost = shape < 1.0
    d = (shape + 1.0 if boost else shape) - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    while True:
        z = float(torch.randn((), generator=gen, dtype=torch.float64))
        v = (1.0 + c * z) ** 3
        if v <= 0.0:
            continue
        u = float(torch.rand((), generator=gen, dtype=torch.float64))
        if u > 0.0 and math.log(u) < 0.5 * z * z + d - d * v + d * math.log(v):
            break
    log_sample = math.log(d * v)
    if boost:
        u = float(torch.rand((), generator=gen, dtype=torch.float64))
        log_sample += math.log(max(u, 1e-300)) / shape
    return log_sample


def sample_beta(alpha: float, gen: torch.Generator) -> float:
    """One draw of Beta(alpha, alpha) from the CPU generator ``gen``, as X / (X + Y) of two Gamma(alpha).

    ``torch.distributions.Beta`` samples from the global RNG. ``torch._standard_gamma`` and
    ``torch._sample_dirichlet`` do take a generator in torch 2.x but are private and undocumented, so the
    Gamma draws are made here from the generator's public ``randn`` / ``rand``.
    """
    log_x, log_y = _log_gamma_sample(alpha, gen), _log_gamma_sample(alpha, gen)
    return 1.0 / (1.0 + math.exp(min(log_y - log_x, 700.0)))


def draw_mix(
    height: int,
    width: int,
    gen: torch.Generator,
    mixup_alpha: float,
    cutmix_alpha: float,
    switch_prob: float = 0.5,
) -> MixPlan:
    """One batch's MixUp or CutMix parameters, from the CPU generator ``gen``.

    With both alphas positive CutMix is chosen with probability ``switch_prob``; with one positive, that one;
    with neither, no mixing. CutMix's box follows torchvision's rule: a random centre, half sides
    ``int(0.5 * sqrt(1 - λ) * size)``, clipped to the image, and λ re-set to the area the box leaves.
    """
    if mixup_alpha < 0 or cutmix_alpha < 0:
        raise ValueError(f"alphas must be non-negative, got mixup {mixup_alpha}, cutmix {cutmix_alpha}")
    if mixup_alpha > 0 and cutmix_alpha > 0:
        use_cutmix = float(torch.rand((), generator=gen)) < switch_prob
    elif mixup_alpha > 0 or cutmix_alpha > 0:
        use_cutmix = cutmix_alpha > 0
    else:
        return MixPlan("none", 1.0)
    if not use_cutmix:
        return MixPlan("mixup", sample_beta(mixup_alpha, gen))
    lam = sample_beta(cutmix_alpha, gen)
    centre_x = int(torch.randint(width, (), generator=gen))
    centre_y = int(torch.randint(height, (), generator=gen))
    half = 0.5 * math.sqrt(1.0 - lam)
    half_w, half_h = int(half * width), int(half * height)
    left, right = max(centre_x - half_w, 0), min(centre_x + half_w, width)
    top, bottom = max(centre_y - half_h, 0), min(centre_y + half_h, height)
    kept = 1.0 - (right - left) * (bottom - top) / (width * height)
    return MixPlan("cutmix", kept, (top, bottom, left, right))


def smoothed_one_hot(labels: torch.Tensor, num_classes: int, label_smoothing: float = 0.0) -> torch.Tensor:
    """``(N, C)`` float32 targets: ``1 - ε + ε / C`` on the label, ``ε / C`` elsewhere (no host read)."""
    off = label_smoothing / num_classes
    targets = torch.full((labels.shape[0], num_classes), off, device=labels.device)
    return targets.scatter_(1, labels.view(-1, 1), 1.0 - label_smoothing + off)


def apply_mix(
    images: torch.Tensor,
    labels: torch.Tensor,
    plan: MixPlan,
    num_classes: int,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix each image with its partner, the image before it in the batch (the first with the last).

    Rolling by one, as torchvision does, needs no random draw and never pairs an image with itself (a drawn
    permutation has about one fixed point per batch); it relies on the batch order being random, which the
    shuffled training sampler provides.
    """
    targets = smoothed_one_hot(labels, num_classes, label_smoothing)
    if plan.kind == "none":
        return images, targets
    return mix_images(images, plan), torch.lerp(targets.roll(1, 0), targets, plan.lam)


def mix_images(images: torch.Tensor, plan: MixPlan) -> torch.Tensor:
    """The images of :func:`apply_mix` alone: each blended with (MixUp) or pasted into (CutMix) by its partner,
    the image before it in the batch. The box and λ are host values: nothing is read from the device."""
    if plan.kind == "none":
        return images
    if plan.kind == "mixup":
        return torch.lerp(images.roll(1, 0), images, plan.lam)
    assert plan.box is not None
    top, bottom, left, right = plan.box
    mixed = images.clone()
    mixed[..., top:bottom, left:right] = images[..., top:bottom, left:right].roll(1, 0)
    return mixed


def mixed_soft_targets(
    labels: torch.Tensor, lam: torch.Tensor, num_classes: int, label_smoothing: float = 0.0
) -> torch.Tensor:
    """The ``(N, C)`` targets of a mixed batch from its labels and its per-image λ ``(N,)`` as a device tensor
    (no host read, so a CUDA graph can hold it): λ of the own smoothed one-hot plus 1 - λ of the partner's
    (the label before it)."""
    targets = smoothed_one_hot(labels, num_classes, label_smoothing)
    return torch.lerp(targets.roll(1, 0), targets, lam.to(targets.dtype).view(-1, 1))


def dominant_labels(labels: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """The label holding the larger share of each mixed image (its own when λ >= 0.5, else its partner's):
    the argmax of the mixed target, label smoothing or not; training accuracy counts hits against it."""
    return torch.where(lam >= 0.5, labels, labels.roll(1, 0))


def mix_batch(
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    gen: torch.Generator,
    mixup_alpha: float,
    cutmix_alpha: float,
    switch_prob: float = 0.5,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MixUp or CutMix of a normalised float batch with int64 labels; returns the images and ``(N, C)`` targets.

    One λ per batch, drawn on the host from ``gen``: nothing is read back from the device. Train on the
    targets with :func:`soft_target_cross_entropy`; accuracy metrics keep using the hard ``labels``.
    """
    plan = draw_mix(images.shape[-2], images.shape[-1], gen, mixup_alpha, cutmix_alpha, switch_prob)
    return apply_mix(images, labels, plan, num_classes, label_smoothing)


def soft_target_cross_entropy(logits: torch.Tensor, soft_targets: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ``-sum(target * log_softmax(logits))``: cross-entropy with probability targets.

    Computed in float32 whatever the logits' dtype, as autocast runs cross-entropy.
    """
    return F.cross_entropy(logits.float(), soft_targets.float())


# ---------------------------------------------------------------------- throughput


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def policy_throughput(
    policy: Policy, batch: int, iterations: int, device: str | torch.device = "cpu", warmup: int = 2
) -> float:
    """Images per second of ``PolicyAugment(policy)`` (draw and apply) on random uint8 32x32 batches."""
    device = torch.device(device)
    augment = PolicyAugment(policy)
    images = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    images = images.to(device)
    gen = torch.Generator().manual_seed(1)
    for _ in range(warmup):
        augment(images, gen)
    _synchronize(device)
    start = time.perf_counter()
    for _ in range(iterations):
        augment(images, gen)
    _synchronize(device)
    return batch * iterations / (time.perf_counter() - start)


def mix_throughput(
    kind: Literal["mixup", "cutmix"], batch: int, iterations: int, device: str | torch.device = "cpu", warmup: int = 2
) -> float:
    """Images per second of :func:`mix_batch` with only ``kind`` on (alpha 1) on random float 32x32 batches."""
    device = torch.device(device)
    images = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(device)
    labels = torch.randint(0, 10, (batch,), generator=torch.Generator().manual_seed(0)).to(device)
    alphas = (1.0, 0.0) if kind == "mixup" else (0.0, 1.0)
    gen = torch.Generator().manual_seed(1)
    for _ in range(warmup):
        mix_batch(images, labels, 10, gen, *alphas)
    _synchronize(device)
    start = time.perf_counter()
    for _ in range(iterations):
        mix_batch(images, labels, 10, gen, *alphas)
    _synchronize(device)
    return batch * iterations / (time.perf_counter() - start)
