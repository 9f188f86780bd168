"""Batch augmentation matches its specification, per sample, on any device (tested on the CPU)."""

import pytest
import torch

from cifar_resnet.data.augment import (
    AugmentConfig,
    BatchAugment,
    Normalize,
    color_jitter,
    cutout,
    random_crop,
    random_hflip,
    random_resized_crop,
)

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _coordinate_images(n: int, size: int = 32) -> torch.Tensor:
    """Channel 0 holds row+1, channel 1 column+1, channel 2 ones: every pixel knows where it came from."""
    rows = torch.arange(1, size + 1, dtype=torch.float32).view(size, 1).expand(size, size)
    cols = torch.arange(1, size + 1, dtype=torch.float32).view(1, size).expand(size, size)
    return torch.stack([rows, cols, torch.ones(size, size)]).expand(n, 3, size, size).clone()


def test_random_crop_is_a_per_sample_translation_within_padding() -> None:
    x = _coordinate_images(256)
    out = random_crop(x, padding=4, gen=_gen())
    assert out.shape == x.shape and out.dtype == x.dtype
    dy = out[:, 0, 16, 16] - 17  # the centre pixel is always inside the image for shifts of at most 4
    dx = out[:, 1, 16, 16] - 17
    assert dy.abs().max() <= 4 and dx.abs().max() <= 4
    assert len(set(zip(dy.tolist(), dx.tolist(), strict=True))) > 40, "offsets must differ per sample"
    assert dy.min() == -4 and dy.max() == 4 and dx.min() == -4 and dx.max() == 4
    rows = torch.arange(32).view(1, 32, 1) + dy.view(-1, 1, 1) + 1
    cols = torch.arange(32).view(1, 1, 32) + dx.view(-1, 1, 1) + 1
    inside = (rows >= 1) & (rows <= 32) & (cols >= 1) & (cols <= 32)
    assert torch.equal(out[:, 0][inside], rows.expand_as(inside)[inside].float())
    assert torch.equal(out[:, 1][inside], cols.expand_as(inside)[inside].float())
    assert torch.all(out.permute(1, 0, 2, 3)[:, ~inside] == 0), "padding is zeros"


def test_random_crop_without_padding_is_identity() -> None:
    x = _coordinate_images(4)
    assert torch.equal(random_crop(x, 0, _gen()), x)


def test_flips_are_horizontal_only_and_per_sample() -> None:
    x = _coordinate_images(200)
    out = random_hflip(x, _gen())
    flipped = torch.tensor([torch.equal(o, i.flip(2)) for o, i in zip(out, x, strict=True)])
    kept = torch.tensor([torch.equal(o, i) for o, i in zip(out, x, strict=True)])
    assert torch.all(flipped ^ kept), "each sample is either mirrored left-right or unchanged"
    assert 60 < int(flipped.sum()) < 140
    assert torch.equal(out[:, 0], x[:, 0]), "rows never move"


def test_batch_augment_keeps_shape_gives_float_and_differs_per_sample() -> None:
    images = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8).expand(64, 3, 32, 32).contiguous()
    cfg = AugmentConfig(color_jitter=(0.4, 0.4, 0.4, 0.1), random_resized_crop=True, cutout=8)
    out = BatchAugment(cfg, MEAN, STD)(images, _gen())
    assert out.shape == images.shape and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    distinct = {tuple(o.flatten().tolist()) for o in out}
    assert len(distinct) == 64, "identical inputs get independent random draws"
    assert images.dtype == torch.uint8, "input untouched"


def test_batch_augment_is_reproducible_from_the_generator() -> None:
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    aug = BatchAugment(AugmentConfig(cutout=8, color_jitter=(0.2, 0.2, 0.2, 0.05)), MEAN, STD)
    assert torch.equal(aug(images, _gen(3)), aug(images, _gen(3)))
    assert not torch.equal(aug(images, _gen(3)), aug(images, _gen(4)))


def test_no_augmentation_is_plain_normalisation() -> None:
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    cfg = AugmentConfig(crop_padding=0, hflip=False)
    expected = (images.float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    assert torch.allclose(BatchAugment(cfg, MEAN, STD)(images, _gen()), expected, atol=1e-6)
    assert torch.allclose(Normalize(MEAN, STD)(images), expected, atol=1e-6)


def test_full_scale_resized_crop_in_the_pipeline_is_plain_normalisation() -> None:
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    cfg = AugmentConfig(
        random_resized_crop=True, rrc_scale=(1.0, 1.0), rrc_ratio=(1.0, 1.0), crop_padding=0, hflip=False
    )
    expected = Normalize(MEAN, STD)(images)
    assert torch.allclose(BatchAugment(cfg, MEAN, STD)(images, _gen()), expected, atol=1e-4)


def test_normalize_round_trips_through_denormalize() -> None:
    norm = Normalize(MEAN, STD)
    x = torch.rand(4, 3, 8, 8)
    assert torch.allclose(norm.denormalize(norm.normalize(x)), x, atol=1e-6)


def test_full_scale_resized_crop_is_identity() -> None:
    x = torch.rand(4, 3, 32, 32)
    out = random_resized_crop(x, _gen(), scale=(1.0, 1.0), ratio=(1.0, 1.0))
    assert torch.allclose(out, x, atol=1e-5)


def test_resized_crop_zooms_in() -> None:
    x = _coordinate_images(32)
    out = random_resized_crop(x, _gen(), scale=(0.1, 0.3), ratio=(0.5, 2.0))
    row_span = out[:, 0, -1, :].mean(1) - out[:, 0, 0, :].mean(1)
    assert out.shape == x.shape
    assert torch.all(row_span < 31), "a smaller area stretched to 32 rows spans fewer source rows"


def test_colour_jitter_stays_in_range_and_hue_keeps_greys() -> None:
    x = torch.rand(32, 3, 16, 16)
    out = color_jitter(x, _gen(), 0.4, 0.4, 0.4, 0.1)
    assert out.min() >= 0 and out.max() <= 1 and not torch.allclose(out, x)
    grey = torch.rand(8, 1, 16, 16).expand(8, 3, 16, 16)
    assert torch.allclose(color_jitter(grey, _gen(), 0, 0, 0, 0.5), grey, atol=1e-5)


def test_colour_jitter_brightness_scales_each_sample_once() -> None:
    x = torch.full((64, 3, 4, 4), 0.5)
    out = color_jitter(x, _gen(), 0.4, 0, 0, 0)
    factors = out[:, 0, 0, 0] / 0.5
    assert torch.allclose(out, factors.view(-1, 1, 1, 1).expand_as(out) * 0.5)
    assert factors.min() >= 0.6 - 1e-6 and factors.max() <= 1.4 + 1e-6 and factors.std() > 0.1


@pytest.mark.parametrize("size", [8, 16])
def test_cutout_zeroes_one_clipped_square_per_sample(size: int) -> None:
    x = torch.ones(128, 3, 32, 32)
    out = cutout(x, size, _gen())
    holes = out[:, 0] == 0
    assert torch.equal(holes.unsqueeze(1).expand_as(out), out == 0), "all channels share the hole"
    areas = holes.sum((1, 2))
    assert areas.max() == size * size and areas.min() >= (size // 2) ** 2
    rows_hit, cols_hit = holes.any(2).sum(1), holes.any(1).sum(1)
    assert torch.equal(rows_hit * cols_hit, areas), "the hole is a rectangle"


def test_colour_jitter_above_one_draws_factors_from_0_as_torchvision_does() -> None:
    x = torch.full((400, 3, 4, 4), 0.1) + torch.linspace(0, 0.2, 4).view(1, 1, 1, 4)
    for b, c, s in ((2.0, 0, 0), (0, 2.0, 0), (0, 0, 2.0)):
        out = color_jitter(x, _gen(), b, c, s, 0)
        assert torch.all(out.flatten(1).amax(1) > 0), "a factor below 0 would blank whole images"
        if b:
            factors = out[:, 0, 0, 0] / 0.1
            assert factors.min() >= 0 and factors.max() <= 3 + 1e-5 and factors.max() > 2.5
