"""Data sources: image folders (decoded once, cached) and torchvision's CIFAR-10 files on disk."""

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cifar_resnet.data import CIFARDataModule, detect_source, sources
from cifar_resnet.data.sources import CIFAR10_CLASSES, load_cifar10, load_image_folder
from cifar_resnet.errors import UserError
from tests.conftest import make_image_folder, write_cifar10_batches


def test_image_folder_decodes_exactly_what_pil_reads(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "d", classes=2, per_class={"train": 3})
    split = load_image_folder(root / "train", cache_dir=None)
    assert split.images.shape == (6, 3, 32, 32) and split.images.dtype == torch.uint8
    assert split.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert split.classes == ("class_0", "class_1")
    first = np.array(Image.open(root / "train" / "class_0" / "0000.png").convert("RGB"))
    assert torch.equal(split.images[0], torch.from_numpy(first).permute(2, 0, 1))


def test_jpeg_decode_matches_pil(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "d", classes=2, per_class={"train": 4}, ext="jpg")
    split = load_image_folder(root / "train", cache_dir=None)
    single = torch.from_numpy(np.array(Image.open(root / "train" / "class_1" / "0002.jpg"))).permute(2, 0, 1)
    assert torch.equal(split.images[6], single)


def test_second_load_comes_from_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_image_folder(tmp_path / "d", classes=2, per_class={"train": 3})
    cache = tmp_path / "cache"
    first = load_image_folder(root / "train", cache)
    assert len(list(cache.glob("imagefolder-train-*.pt"))) == 1

    def no_decoding(paths: list[str]) -> list[torch.Tensor]:
        raise AssertionError("decoded again despite a valid cache")

    monkeypatch.setattr(sources, "_decode_files", no_decoding)
    second = load_image_folder(root / "train", cache)
    assert torch.equal(first.images, second.images) and torch.equal(first.labels, second.labels)


def test_changed_files_invalidate_the_cache(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "d", classes=2, per_class={"train": 3})
    cache = tmp_path / "cache"
    load_image_folder(root / "train", cache)
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(root / "train" / "class_1" / "9999.png")
    assert len(load_image_folder(root / "train", cache)) == 7
    assert len(list(cache.glob("imagefolder-train-*.pt"))) == 2


def test_damaged_cache_is_rebuilt(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "d", classes=2, per_class={"train": 3})
    cache = tmp_path / "cache"
    good = load_image_folder(root / "train", cache)
    cache_file = next(cache.glob("*.pt"))
    cache_file.write_bytes(b"not a tensor file")
    assert torch.equal(load_image_folder(root / "train", cache).images, good.images)


def test_images_of_other_sizes_are_resized_with_a_warning(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "d", classes=2, per_class={"train": 2}, size=48)
    with pytest.warns(UserWarning, match="resized"):
        split = load_image_folder(root / "train", cache_dir=None)
    assert split.images.shape == (4, 3, 32, 32)


def test_corrupt_image_is_named_in_a_user_error(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "d", classes=2, per_class={"train": 2}, ext="jpg")
    bad = root / "train" / "class_1" / "0001.jpg"
    bad.write_bytes(b"\xff\xd8 definitely not a jpeg")
    with pytest.raises(UserError, match=r"0001\.jpg"):
        load_image_folder(root / "train", cache_dir=None)


def test_folder_without_classes_is_a_user_error(tmp_path: Path) -> None:
    (tmp_path / "d" / "train").mkdir(parents=True)
    with pytest.raises(UserError, match="has no class folders"):
        load_image_folder(tmp_path / "d" / "train", cache_dir=None)


def test_one_class_folder_an_empty_class_a_link_loop_and_a_broken_link_are_each_one_clear_error(
    tmp_path: Path,
) -> None:
    root = make_image_folder(tmp_path / "one", classes=1)
    with pytest.raises(UserError, match=r"has one class folder \(class_0\); a classifier needs two or more"):
        load_image_folder(root / "train", cache_dir=None)

    root = make_image_folder(tmp_path / "empty", classes=3)
    (root / "train" / "class_3").mkdir()
    with pytest.raises(UserError, match=r"no images .* in class folder class_3"):
        load_image_folder(root / "train", cache_dir=None)

    root = make_image_folder(tmp_path / "loop", classes=2)
    (root / "train" / "class_1" / "again").symlink_to(root / "train" / "class_1")
    with pytest.raises(UserError, match="is a symbolic link loop"):
        load_image_folder(root / "train", cache_dir=None)

    root = make_image_folder(tmp_path / "broken", classes=2)
    (root / "train" / "class_0" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    with pytest.raises(UserError, match=r"gone\.png is a broken symbolic link .*; remove it or restore its target"):
        load_image_folder(root / "train", cache_dir=None)


def test_16_bit_grey_and_colour_images_and_palette_and_alpha_images_decode_to_their_8_bit_rgb(tmp_path: Path) -> None:
    from cifar_resnet.data.images import decode_image

    ramp = np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "grey16.png")
    grey = decode_image(tmp_path / "grey16.png")
    assert grey.dtype == torch.uint8 and grey.shape == (3, 32, 32)
    expected = torch.from_numpy(np.rint(ramp / 257.0).astype(np.uint8))
    assert torch.equal(grey[0], expected) and torch.equal(grey[1], grey[2]), "scaled, not clipped at 255"
    assert 120 < float(grey.float().mean()) < 135, "a ramp averages mid-grey, not white"

    rgb = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(rgb).convert("P").save(tmp_path / "palette.png")
    Image.fromarray(np.dstack([rgb, np.full((32, 32), 7, np.uint8)])).save(tmp_path / "alpha.png")
    assert torch.equal(decode_image(tmp_path / "alpha.png"), torch.from_numpy(rgb).permute(2, 0, 1))
    with Image.open(tmp_path / "palette.png") as img:
        palette_rgb = torch.from_numpy(np.asarray(img.convert("RGB")).copy()).permute(2, 0, 1)
    assert torch.equal(decode_image(tmp_path / "palette.png"), palette_rgb)


def test_an_image_pil_refuses_as_too_large_is_a_user_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cifar_resnet.data.images import decode_image

    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64x64 = 4096 pixels: over twice the limit
    with pytest.raises(UserError, match=r"big\.png is too large to decode safely"):
        decode_image(tmp_path / "big.png")


def test_source_is_detected_from_the_layout(tmp_path: Path) -> None:
    assert detect_source(make_image_folder(tmp_path / "f", per_class={"train": 1})) == "imagefolder"
    assert detect_source(tmp_path / "missing") == "cifar10"


def test_torchvision_cifar10_files_are_read_in_their_on_disk_format(tmp_path: Path) -> None:
    root = write_cifar10_batches(tmp_path / "data")
    train = load_cifar10(root, train=True)
    test = load_cifar10(root, train=False)
    assert train.images.shape == (30, 3, 32, 32) and train.images.dtype == torch.uint8
    assert len(test) == 7 and train.classes == CIFAR10_CLASSES
    with open(root / "cifar-10-batches-py" / "data_batch_1", "rb") as f:
        first = pickle.load(f)
    expected = torch.from_numpy(first["data"][0].reshape(3, 32, 32))
    assert torch.equal(train.images[0], expected), "row-major CHW pixels, as CIFAR-10 stores them"
    assert train.labels[:6].tolist() == first["labels"]


def test_datamodule_on_cifar10_files_splits_and_tests(tmp_path: Path) -> None:
    root = write_cifar10_batches(tmp_path / "data", train_per_batch=20)
    dm = CIFARDataModule(data_dir=str(root), val_size=20, batch_size=8)
    dm.prepare_data()  # files present: no download attempted
    dm.setup("fit")
    assert dm.source == "cifar10" and dm.num_classes == 10
    assert (len(dm.train_split), len(dm.val_split), len(dm.test_split)) == (80, 20, 7)


def test_truncated_cifar_batch_is_a_user_error(tmp_path: Path) -> None:
    root = write_cifar10_batches(tmp_path / "data")
    batch = root / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[:100])
    with pytest.raises(UserError, match="unreadable"):
        load_cifar10(root, train=True)


def test_missing_cifar_files_without_network_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no CIFAR-10 files"):
        load_cifar10(tmp_path / "empty", train=True)


@pytest.mark.parametrize("split", ["train", "test"])
def test_a_class_folder_that_is_a_broken_link_or_a_link_loop_is_refused_naming_it(split: str, tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "broken")
    (root / split / "class_3").symlink_to(tmp_path / "moved_away")
    with pytest.raises(UserError, match=rf"class folder {root}/{split}/class_3 is a broken symbolic link \(to "):
        load_image_folder(root / split, cache_dir=None)

    root = make_image_folder(tmp_path / "loop")
    (root / split / "class_3").symlink_to(root / split / "class_3")
    with pytest.raises(UserError, match=rf"class folder {root}/{split}/class_3 is a symbolic link loop"):
        load_image_folder(root / split, cache_dir=None)
    if split == "train":
        with pytest.raises(UserError, match="is a symbolic link loop"):
            _ = CIFARDataModule(str(root)).num_classes  # the class count a run is built with


def test_a_cache_folder_that_cannot_be_written_is_one_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_image_folder(tmp_path / "d")
    cache = tmp_path / "read_only_cache"

    def refused(obj: object, path: Path) -> None:  # as a folder without write permission answers (EACCES)
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(sources, "atomic_torch_save", refused)
    dm = CIFARDataModule(str(root), val_size=6, batch_size=8, cache_dir=str(cache))
    with pytest.warns(UserWarning) as caught:
        dm.prepare_data()  # train and test
        dm.setup("fit")  # both again
    messages = [str(w.message) for w in caught if "cache" in str(w.message)]
    assert messages == [f"cannot write the decoded-image cache in {cache} (Permission denied); images are decoded "
                        "again on every run: pass --cache_dir with a folder you can write to"]  # fmt: skip


def test_the_augmentation_preview_is_a_seeded_sample_across_classes(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "d", classes=4, per_class={"train": 20})
    dm = CIFARDataModule(
        str(root), val_size=8, batch_size=8, crop_padding=0, hflip=False
    )  # no augmentation: images as stored
    dm.setup("fit")
    preview = dm.augmented_preview(8, seed=1)
    pixels = (preview * 255).round().to(torch.uint8)
    train = dm.train_split
    found = [next(i for i in range(len(train)) if torch.equal(train.images[i], image)) for image in pixels]
    assert sorted(train.labels[found].tolist()) == [0, 0, 1, 1, 2, 2, 3, 3], "every class, in turn"
    assert torch.equal(dm.augmented_preview(8, seed=1), preview), "seeded"
    assert not torch.equal(dm.augmented_preview(8, seed=2), preview)
    assert found != sorted(found), "a sample, not the first images"
