"""Policy augmentation draws an op per image with the policy's odds, reproducibly, and each op is torchvision's;
MixUp / CutMix mix one λ per batch with matching soft targets."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torchvision.transforms import v2

from cifar_resnet.data.policies import (
    AUTOAUGMENT_CIFAR10,
    OP_NAMES,
    MixPlan,
    PolicyAugment,
    PolicyPlan,
    apply_mix,
    draw_mix,
    magnitude_table,
    mix_batch,
    mix_throughput,
    policy_throughput,
    sample_beta,
    smoothed_one_hot,
    soft_target_cross_entropy,
)

POLICIES = ("autoaugment", "randaugment", "trivialaugment")
# torchvision's class for each policy, the number of magnitude bins it uses, and the ops it draws from.
TORCHVISION = {
    "autoaugment": (v2.AutoAugment, 10),
    "randaugment": (v2.RandAugment, 31),
    "trivialaugment": (v2.TrivialAugmentWide, 31),
}


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _pictures(n: int, seed: int = 0) -> torch.Tensor:
    """Smooth random pictures with noise, each channel in its own sub-range; one channel of image 0 is flat."""
    g = _gen(seed)
    smooth = F.interpolate(torch.rand(n, 3, 4, 4, generator=g), size=32, mode="bilinear", align_corners=False)
    noise = torch.rand(n, 3, 32, 32, generator=g)
    low = 0.5 * torch.rand(n, 3, 1, 1, generator=g)
    span = 0.2 + 0.5 * torch.rand(n, 3, 1, 1, generator=g)
    images = ((low + span * (0.8 * smooth + 0.2 * noise)) * 255).to(torch.uint8)
    images[0, 1] = 77
    return images


def _plan_of_one_op(name: str, n: int, magnitude_bin: int, negate: bool) -> PolicyPlan:
    full = torch.full((1, n), 1)
    return PolicyPlan(full * OP_NAMES.index(name), full * magnitude_bin, (full * negate).bool())


def _torchvision_op(image: torch.Tensor, name: str, magnitude: float, fill: int | None = None) -> torch.Tensor:
    """One op on one image with torchvision's functionals, as its auto-augment transforms call them."""
    nearest = v2.InterpolationMode.NEAREST
    shear = math.degrees(math.atan(magnitude))
    calls = {
        "Identity": lambda: image,
        "ShearX": lambda: TF.affine(image, 0.0, [0, 0], 1.0, [shear, 0.0], nearest, fill, center=[0, 0]),
        "ShearY": lambda: TF.affine(image, 0.0, [0, 0], 1.0, [0.0, shear], nearest, fill, center=[0, 0]),
        "TranslateX": lambda: TF.affine(image, 0.0, [int(magnitude), 0], 1.0, [0.0, 0.0], nearest, fill),
        "TranslateY": lambda: TF.affine(image, 0.0, [0, int(magnitude)], 1.0, [0.0, 0.0], nearest, fill),
        "Rotate": lambda: TF.rotate(image, magnitude, nearest, fill=fill),
        "Brightness": lambda: TF.adjust_brightness(image, 1.0 + magnitude),
        "Color": lambda: TF.adjust_saturation(image, 1.0 + magnitude),
        "Contrast": lambda: TF.adjust_contrast(image, 1.0 + magnitude),
        "Sharpness": lambda: TF.adjust_sharpness(image, 1.0 + magnitude),
        "Posterize": lambda: TF.posterize(image, int(magnitude)),
        "Solarize": lambda: TF.solarize(image, 255.0 * magnitude),
        "AutoContrast": lambda: TF.autocontrast(image),
        "Equalize": lambda: TF.equalize(image),
        "Invert": lambda: TF.invert(image),
    }
    return calls[name]()


def _torchvision_magnitude(policy: str, name: str, magnitude_bin: int, negate: bool, size: tuple[int, int]) -> float:
    """The magnitude torchvision's transform would pass for this op and bin (its own table)."""
    cls, bins = TORCHVISION[policy]
    if name not in cls._AUGMENTATION_SPACE:
        return 0.0
    table_of, signed = cls._AUGMENTATION_SPACE[name]
    table = table_of(bins, *size)
    if table is None:
        return 0.0
    value = float(table[magnitude_bin])
    return -value if signed and negate else value


# ---------------------------------------------------------------------- randomness per image


@pytest.mark.parametrize("policy", POLICIES)
def test_identical_images_get_their_own_ops(policy: str) -> None:
    images = _pictures(1).expand(256, 3, 32, 32).contiguous()
    out = PolicyAugment(policy)(images, _gen())
    distinct = {tuple(o.flatten().tolist()) for o in out}
    assert len(distinct) > 50, f"{policy}: {len(distinct)} distinct results from 256 draws"
    assert torch.equal(images, _pictures(1).expand(256, 3, 32, 32)), "input untouched"


def _assert_frequency(count: int, total: int, p: float, what: str) -> None:
    sigma = math.sqrt(total * p * (1 - p))
    assert abs(count - total * p) <= 5 * sigma + 1, f"{what}: {count} of {total}, expected {total * p:.0f}"


def test_trivialaugment_draws_ops_and_bins_uniformly() -> None:
    n = 20_000
    plan = PolicyAugment("trivialaugment").draw(n, _gen())
    assert plan.ops.shape == (1, n) and plan.sub_policies is None
    drawn = [name for name in OP_NAMES if name != "Invert"]
    for name in OP_NAMES:
        count = int((plan.ops == OP_NAMES.index(name)).sum())
        if name in drawn:
            _assert_frequency(count, n, 1 / len(drawn), name)
        else:
            assert count == 0, f"TrivialAugmentWide never draws {name}"
    for magnitude_bin in range(31):
        _assert_frequency(int((plan.bins == magnitude_bin).sum()), n, 1 / 31, f"bin {magnitude_bin}")
    _assert_frequency(int(plan.negate.sum()), n, 0.5, "negative sign")


def test_randaugment_draws_each_layer_uniformly_at_the_fixed_magnitude() -> None:
    n = 10_000
    plan = PolicyAugment("randaugment", num_ops=3, magnitude=7).draw(n, _gen())
    assert plan.ops.shape == (3, n)
    assert torch.all(plan.bins == 7)
    for layer in range(3):
        for name in OP_NAMES[:-1]:
            _assert_frequency(int((plan.ops[layer] == OP_NAMES.index(name)).sum()), n, 1 / 14, f"{layer} {name}")
    assert not torch.equal(plan.ops[0], plan.ops[1]), "layers draw independently"


def test_autoaugment_draws_sub_policies_uniformly_and_applies_each_op_with_its_probability() -> None:
    n = 50_000
    plan = PolicyAugment("autoaugment").draw(n, _gen())
    assert plan.sub_policies is not None and plan.ops.shape == (2, n)
    for index, sub_policy in enumerate(AUTOAUGMENT_CIFAR10):
        chosen = plan.sub_policies == index
        total = int(chosen.sum())
        _assert_frequency(total, n, 1 / 25, f"sub-policy {index}")
        for layer, (name, probability, magnitude_bin) in enumerate(sub_policy):
            ops = plan.ops[layer, chosen]
            applied = int((ops == OP_NAMES.index(name)).sum())
            if name != "Identity":
                assert torch.all((ops == OP_NAMES.index(name)) | (ops == 0)), "an entry runs its op or nothing"
            _assert_frequency(applied, total, probability, f"sub-policy {index} entry {layer} ({name})")
            if magnitude_bin is not None:
                assert torch.all(plan.bins[layer, chosen] == magnitude_bin)


def test_the_cifar10_policy_is_torchvisions() -> None:
    reference = v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10)._policies
    assert [tuple(pair) for pair in reference] == list(AUTOAUGMENT_CIFAR10)


# ---------------------------------------------------------------------- reproducibility


@pytest.mark.parametrize("policy", POLICIES)
def test_same_seed_same_output_other_seed_other_output(policy: str) -> None:
    images = _pictures(64)
    augment = PolicyAugment(policy)
    assert torch.equal(augment(images, _gen(5)), augment(images, _gen(5)))
    assert not torch.equal(augment(images, _gen(5)), augment(images, _gen(6)))


@pytest.mark.parametrize("policy", POLICIES)
def test_batched_result_equals_each_image_alone(policy: str) -> None:
    """Sorting by op and restoring the order is invisible: every image gets exactly its own plan."""
    images = _pictures(48)
    augment = PolicyAugment(policy, fill=9)
    plan = augment.draw(48, _gen(2))
    columns = [(plan.ops[:, i, None], plan.bins[:, i, None], plan.negate[:, i, None]) for i in range(48)]
    alone = [augment.apply(images[i, None], PolicyPlan(*column)) for i, column in enumerate(columns)]
    assert torch.equal(augment.apply(images, plan), torch.cat(alone))


# ---------------------------------------------------------------------- each op is torchvision's


@pytest.mark.parametrize("size", [(32, 32), (24, 40)])
@pytest.mark.parametrize("policy", POLICIES)
def test_magnitude_tables_are_torchvisions(policy: str, size: tuple[int, int]) -> None:
    augment = PolicyAugment(policy)
    table = magnitude_table(augment.wide, augment.num_bins, *size)
    for op, name in enumerate(OP_NAMES):
        for magnitude_bin in range(augment.num_bins):
            expected = _torchvision_magnitude(policy, name, magnitude_bin, False, size)
            assert table[op, magnitude_bin] == pytest.approx(expected, abs=1e-12), (name, magnitude_bin)


# Every op a policy uses (RandAugment and TrivialAugmentWide have no Invert): no case that can only skip.
POLICY_OPS = [(policy, name) for policy in POLICIES for name in OP_NAMES
              if name == "Identity" or name in TORCHVISION[policy][0]._AUGMENTATION_SPACE]  # fmt: skip


@pytest.mark.parametrize(("policy", "name"), POLICY_OPS)
def test_each_op_matches_torchvision(policy: str, name: str) -> None:
    _, bins = TORCHVISION[policy]
    images = _pictures(6)
    augment = PolicyAugment(policy)
    # First, last and middle bins; bin 20 of 31 is TrivialAugmentWide's 90° rotation (torchvision's rot90 path).
    for magnitude_bin in sorted({0, 1, bins // 2, 20 % bins, bins - 1}):
        for negate in (False, True):
            plan = _plan_of_one_op(name, len(images), magnitude_bin, negate)
            magnitude = _torchvision_magnitude(policy, name, magnitude_bin, negate, (32, 32))
            assert augment.magnitudes(plan, 32, 32)[0, 0].item() == pytest.approx(magnitude, abs=1e-12)
            ours = augment.apply(images, plan)
            expected = torch.stack([_torchvision_op(image, name, magnitude) for image in images])
            assert torch.equal(ours, expected), f"{name} bin {magnitude_bin} magnitude {magnitude}"


@pytest.mark.parametrize("name", ["ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"])
def test_geometric_ops_match_torchvision_on_oblong_images(name: str) -> None:
    images = F.interpolate(_pictures(4).float(), size=(24, 40)).to(torch.uint8)
    augment = PolicyAugment("randaugment")
    for magnitude_bin in (7, 30):
        for negate in (False, True):
            plan = _plan_of_one_op(name, 4, magnitude_bin, negate)
            magnitude = _torchvision_magnitude("randaugment", name, magnitude_bin, negate, (24, 40))
            expected = torch.stack([_torchvision_op(image, name, magnitude) for image in images])
            assert torch.equal(augment.apply(images, plan), expected), f"{name} bin {magnitude_bin}"


@pytest.mark.parametrize("name", ["ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"])
def test_geometric_ops_fill_like_torchvision(name: str) -> None:
    images = _pictures(4)
    plan = _plan_of_one_op(name, 4, 25, True)
    magnitude = _torchvision_magnitude("trivialaugment", name, 25, True, (32, 32))
    ours = PolicyAugment("trivialaugment", fill=200).apply(images, plan)
    expected = torch.stack([_torchvision_op(image, name, magnitude, fill=200) for image in images])
    assert torch.equal(ours, expected)
    assert (ours == 200).float().mean() > 0.1, "the ops move pixels in from outside"


@pytest.mark.parametrize("policy", POLICIES)
def test_whole_plans_match_torchvision_op_by_op(policy: str) -> None:
    """A drawn plan equals torchvision's ops run image by image, in the plan's order."""
    images = _pictures(64, seed=1)
    augment = PolicyAugment(policy)
    plan = augment.draw(64, _gen(3))
    magnitudes = augment.magnitudes(plan, 32, 32)
    expected = []
    for i, image in enumerate(images):
        for layer in range(plan.ops.shape[0]):
            image = _torchvision_op(image, OP_NAMES[plan.ops[layer, i]], float(magnitudes[layer, i]))
        expected.append(image)
    assert torch.equal(augment.apply(images, plan), torch.stack(expected))


# ---------------------------------------------------------------------- contract


@pytest.mark.parametrize("policy", POLICIES)
def test_output_keeps_dtype_shape_and_device(policy: str) -> None:
    images = _pictures(16)
    out = PolicyAugment(policy)(images, _gen())
    assert out.dtype == torch.uint8 and out.shape == images.shape and out.device == images.device
    assert out.data_ptr() != images.data_ptr()


@pytest.mark.parametrize("policy", POLICIES)
def test_no_tensor_is_read_back_from_the_batch_device(policy: str) -> None:
    """On the meta device a tensor has no data: ``.item()``, ``nonzero`` or a boolean mask would raise."""
    images = torch.empty(64, 3, 32, 32, dtype=torch.uint8, device="meta")
    out = PolicyAugment(policy, fill=3)(images, _gen())
    assert out.device.type == "meta" and out.shape == images.shape and out.dtype == torch.uint8


def test_identity_leaves_pixels_unchanged() -> None:
    images = _pictures(8)
    out = PolicyAugment("randaugment").apply(images, _plan_of_one_op("Identity", 8, 9, True))
    assert torch.equal(out, images)
    assert torch.equal(PolicyAugment("randaugment", num_ops=0)(images, _gen()), images)


def test_other_sizes_and_empty_batches() -> None:
    augment = PolicyAugment("trivialaugment")
    images = torch.randint(0, 256, (20, 3, 24, 40), dtype=torch.uint8, generator=_gen())
    assert augment(images, _gen()).shape == (20, 3, 24, 40)
    assert augment(images[:0], _gen()).shape == (0, 3, 24, 40)


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="uint8"):
        PolicyAugment("trivialaugment")(torch.rand(2, 3, 32, 32), _gen())
    with pytest.raises(ValueError, match="policy"):
        PolicyAugment("augmix")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="magnitude"):
        PolicyAugment("randaugment", magnitude=31)


def test_describe_names_the_policy_and_its_settings() -> None:
    assert "AutoAugment (CIFAR-10 policy, 25 sub-policies)" in PolicyAugment("autoaugment").describe()
    assert "2 ops, magnitude 9 of 31 bins" in PolicyAugment("randaugment").describe()
    assert "TrivialAugmentWide" in PolicyAugment("trivialaugment", fill=128).describe()
    assert "fill 128" in PolicyAugment("trivialaugment", fill=128).describe()


def test_policy_throughput_reports_images_per_second() -> None:
    assert policy_throughput("trivialaugment", batch=8, iterations=2) > 0


# ---------------------------------------------------------------------- MixUp and CutMix


@pytest.mark.parametrize("alpha", [0.2, 1.0, 4.0])
def test_beta_sampler_matches_torch_beta(alpha: float) -> None:
    g = _gen(int(alpha * 10))
    ours = torch.tensor([sample_beta(alpha, g) for _ in range(3000)], dtype=torch.float64)
    torch.manual_seed(0)
    reference = torch.distributions.Beta(alpha, alpha).sample((3000,)).double()
    assert ours.min() >= 0 and ours.max() <= 1
    assert ours.mean().item() == pytest.approx(0.5, abs=0.02)
    assert ours.var().item() == pytest.approx(1 / (4 * (2 * alpha + 1)), rel=0.1)
    grid = torch.linspace(0, 1, 201, dtype=torch.float64)
    cdf = (ours[None, :] <= grid[:, None]).double().mean(1)
    reference_cdf = (reference[None, :] <= grid[:, None]).double().mean(1)
    assert (cdf - reference_cdf).abs().max() < 0.05, "two-sample Kolmogorov-Smirnov distance"


def _batch(n: int = 16, classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    g = _gen(4)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, classes, (n,), generator=g)


def test_mixup_mixes_every_image_with_the_one_before_it() -> None:
    images, labels = _batch()
    plan = draw_mix(32, 32, _gen(), mixup_alpha=1.0, cutmix_alpha=0.0)
    assert plan.kind == "mixup" and 0 < plan.lam < 1 and plan.box is None
    mixed, targets = apply_mix(images, labels, plan, num_classes=10)
    partner = images.roll(1, 0)
    assert torch.allclose(mixed, plan.lam * images + (1 - plan.lam) * partner, atol=1e-6)
    expected = plan.lam * F.one_hot(labels, 10) + (1 - plan.lam) * F.one_hot(labels.roll(1, 0), 10)
    assert torch.allclose(targets, expected.float(), atol=1e-6)
    assert torch.allclose(targets.sum(1), torch.ones(16))


def test_cutmix_pastes_the_partners_box_and_weights_labels_by_area() -> None:
    images, labels = _batch()
    for seed in range(20):
        plan = draw_mix(32, 32, _gen(seed), mixup_alpha=0.0, cutmix_alpha=1.0)
        assert plan.kind == "cutmix" and plan.box is not None
        top, bottom, left, right = plan.box
        assert 0 <= top <= bottom <= 32 and 0 <= left <= right <= 32
        area = (bottom - top) * (right - left) / (32 * 32)
        assert plan.lam == pytest.approx(1 - area)
        mixed, targets = apply_mix(images, labels, plan, num_classes=10)
        inside = torch.zeros(32, 32, dtype=torch.bool)
        inside[top:bottom, left:right] = True
        assert torch.equal(mixed[..., inside], images.roll(1, 0)[..., inside])
        assert torch.equal(mixed[..., ~inside], images[..., ~inside])
        own = targets.gather(1, labels.view(-1, 1)).squeeze(1)
        same_label = labels == labels.roll(1, 0)
        assert torch.allclose(own[~same_label], torch.full_like(own[~same_label], 1 - area))
        assert torch.allclose(targets.sum(1), torch.ones(16))


def test_cutmix_area_is_distributed_as_torchvisions() -> None:
    """Same Beta(1, 1) λ and box rule: the kept fraction λ has torchvision's distribution (two-sample KS)."""
    draws = 2000
    g = _gen()
    ours = torch.tensor([draw_mix(32, 32, g, 0.0, 1.0).lam for _ in range(draws)])
    torch.manual_seed(0)
    image = torch.zeros(3, 32, 32)
    theirs = torch.tensor([v2.CutMix(num_classes=10).make_params([image])["lam_adjusted"] for _ in range(draws)])
    grid = torch.linspace(0, 1, 401)
    distance = ((ours[None] <= grid[:, None]).float().mean(1) - (theirs[None] <= grid[:, None]).float().mean(1)).abs()
    assert distance.max() < 0.07


def test_switch_prob_picks_cutmix_that_often_and_one_alpha_picks_its_mix() -> None:
    g = _gen()
    kinds = [draw_mix(32, 32, g, 1.0, 1.0, switch_prob=0.3).kind for _ in range(2000)]
    _assert_frequency(kinds.count("cutmix"), 2000, 0.3, "CutMix")
    assert {draw_mix(32, 32, g, 0.4, 0.0).kind for _ in range(20)} == {"mixup"}
    assert {draw_mix(32, 32, g, 0.0, 0.4).kind for _ in range(20)} == {"cutmix"}
    assert draw_mix(32, 32, g, 0.0, 0.0) == MixPlan("none", 1.0)


def test_mix_batch_is_reproducible_from_the_generator() -> None:
    images, labels = _batch()
    first = mix_batch(images, labels, 10, _gen(7), 0.8, 1.0, label_smoothing=0.1)
    again = mix_batch(images, labels, 10, _gen(7), 0.8, 1.0, label_smoothing=0.1)
    other = mix_batch(images, labels, 10, _gen(8), 0.8, 1.0, label_smoothing=0.1)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[1], other[1])


def test_label_smoothing_spreads_epsilon_over_the_classes() -> None:
    labels = torch.tensor([0, 3, 9])
    targets = smoothed_one_hot(labels, 10, 0.1)
    assert torch.allclose(targets.sum(1), torch.ones(3))
    assert torch.allclose(targets[0], torch.tensor([0.91] + [0.01] * 9))
    images, labels = _batch()
    _, mixed = mix_batch(images, labels, 10, _gen(), 1.0, 0.0, label_smoothing=0.2)
    assert torch.allclose(mixed.sum(1), torch.ones(16)) and mixed.min() >= 0.02 - 1e-6


def test_mixing_reads_nothing_back_from_the_batch_device() -> None:
    images = torch.empty(16, 3, 32, 32, device="meta")
    labels = torch.empty(16, dtype=torch.int64, device="meta")
    for alphas in ((1.0, 0.0), (0.0, 1.0)):
        mixed, targets = mix_batch(images, labels, 10, _gen(), *alphas, label_smoothing=0.1)
        assert mixed.shape == images.shape and targets.shape == (16, 10)


def test_soft_target_cross_entropy_is_cross_entropy_on_one_hot_targets() -> None:
    logits = torch.randn(32, 10, generator=_gen())
    labels = torch.randint(0, 10, (32,), generator=_gen(1))
    one_hot = F.one_hot(labels, 10).float()
    assert torch.allclose(soft_target_cross_entropy(logits, one_hot), F.cross_entropy(logits, labels))
    smoothed = smoothed_one_hot(labels, 10, 0.1)
    expected = F.cross_entropy(logits, labels, label_smoothing=0.1)
    assert torch.allclose(soft_target_cross_entropy(logits, smoothed), expected)


def test_mix_throughput_reports_images_per_second() -> None:
    assert mix_throughput("cutmix", batch=8, iterations=2) > 0
