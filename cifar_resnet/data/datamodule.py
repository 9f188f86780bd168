"""The LightningDataModule: uint8 tensors in memory, seeded samplers, augmentation after device transfer."""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from cifar_resnet.config import DataConfig, as_dict, upgrade_names
from cifar_resnet.data.augment import AugmentConfig, BatchAugment, Normalize, to_device
from cifar_resnet.data.images import class_names
from cifar_resnet.data.policies import draw_mix, mix_images
from cifar_resnet.data.sources import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    TORCHVISION_SETS,
    ImageSplit,
    default_cache_dir,
    download,
    load_image_folder,
    load_torchvision,
    resolve_dataset,
)
from cifar_resnet.data.split import interleave_by_class, stratified_split
from cifar_resnet.data.workers import worker_init
from cifar_resnet.errors import UserError


class TensorImageDataset(Dataset):
    """Index into in-memory uint8 images; ``__getitems__`` returns a whole batch in one indexing op.

    Inside a worker process the batch is returned as numpy arrays, which the loader's queue pickles by
    value. torch would instead move each tensor to a fresh shared-memory segment and pass its file
    descriptor over a socket, which for a 393 KB batch of 128 images costs more than copying the bytes
    through the pipe (2 workers on 2 cores: 63,000 images/s as tensors, 167,000 as numpy arrays).
    :class:`TensorBatchLoader` turns them back into tensors in the main process.
    """

    def __init__(self, split: ImageSplit) -> None:
        self.images = split.images
        self.labels = split.labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self.labels[index]

    def __getitems__(self, indices: list[int] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Index tensors from EpochBatchSampler are pinned when the images live on a GPU: an asynchronous copy.
        idx = torch.as_tensor(indices, dtype=torch.int64).to(self.images.device, non_blocking=True)
        images, labels = self.images[idx], self.labels[idx]
        if get_worker_info() is not None:
            return images.numpy(), labels.numpy()
        return images, labels


class EpochBatchSampler(Sampler[Any]):
    """This process's training batches of one epoch, as index tensors.

    The order is the one torch's ``DistributedSampler`` draws for ``(seed, epoch)`` with ``drop_last``: one
    permutation of the whole set, this rank's every ``world``-th element of its first ``world * (n // world)``,
    cut into full batches. Batches are slices of one index tensor, not Python lists, and the tensor is pinned
    when the batches feed a GPU, so sending each batch's indices to the device is an asynchronous copy.

    The epoch is read from the trainer whenever iteration starts: after a resume with persistent worker
    processes the loader's iterator can be created before Lightning restores its epoch counter, which would
    replay epoch 0's order (lightning #21938).
    """

    def __init__(
        self,
        size: int,
        batch_size: int,
        world: int,
        rank: int,
        seed: int,
        epoch_of: Callable[[], int],
        pin_memory: bool = False,
        as_lists: bool = False,
    ) -> None:
        self.size, self.batch_size, self.world, self.rank, self.seed = size, batch_size, world, rank, seed
        self.epoch_of = epoch_of
        self.pin_memory = pin_memory
        self.as_lists = as_lists  # worker processes receive lists: a tensor would travel through shared memory
        self.skip = 0  # batches of the next iteration already trained (a resumed epoch)

    def __len__(self) -> int:
        return (self.size // self.world) // self.batch_size

    def indices(self, epoch: int) -> torch.Tensor:
        """This rank's sample order of ``epoch``."""
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + epoch))
        per_rank = self.size // self.world
        return order[: per_rank * self.world][self.rank :: self.world]

    def __iter__(self) -> Iterator[Any]:
        mine = self.indices(self.epoch_of())
        if self.pin_memory:
            mine = mine.pin_memory()
        first, self.skip = self.skip, 0
        for start in range(first * self.batch_size, len(self) * self.batch_size, self.batch_size):
            batch = mine[start : start + self.batch_size]
            yield batch.tolist() if self.as_lists else batch


def keep_batch(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Collate for :class:`TensorImageDataset`: its ``__getitems__`` already returns a batch."""
    return batch


class TensorBatchLoader(DataLoader):
    """A DataLoader over :class:`TensorImageDataset` that always yields ``(images, labels)`` tensors.

    Batches from worker processes arrive as numpy arrays (see :class:`TensorImageDataset`); they become
    tensors again here without a copy, and are pinned when ``pin_memory`` is set, since the loader's own
    pinning thread only pins tensors.
    """

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        batches = super().__iter__()
        if self.num_workers == 0:
            return batches
        return (self._as_tensors(batch) for batch in batches)

    def _as_tensors(self, batch: tuple[Any, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = (torch.from_numpy(part) for part in batch)
        if self.pin_memory:
            images, labels = images.pin_memory(), labels.pin_memory()
        return images, labels


class TrainingLoader(TensorBatchLoader):
    """The training loader, resumable in the middle of an epoch.

    Lightning saves ``state_dict()`` in every checkpoint and hands it back through ``load_state_dict()``
    before it iterates again; the next iteration of the same epoch then skips the batches already trained.
    ``position`` is the index in the epoch of the batch last handed out, which names the batch's
    augmentation randomness.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.epoch = -1
        self.position = -1
        self._resume: tuple[int, int] | None = None

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batches": self.position + 1}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self._resume = (int(state_dict["epoch"]), int(state_dict["batches"]))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        sampler: EpochBatchSampler = self.batch_sampler  # type: ignore[assignment]
        epoch = sampler.epoch_of()
        skip = self._resume[1] if self._resume is not None and self._resume[0] == epoch else 0
        self._resume = None
        sampler.skip = skip
        self.epoch, self.position = epoch, skip - 1
        for batch in super().__iter__():
            self.position += 1
            yield batch


def data_fingerprint(split: ImageSplit) -> str:
    """A digest of every training image, its label and its order: equal only for the same data, as loaded."""
    digest = hashlib.sha256(",".join(split.classes).encode())
    digest.update(split.labels.numpy().tobytes())
    digest.update(split.images.numpy().tobytes())
    return digest.hexdigest()[:16]


def check_same_data(stored: dict[str, Any], classes: list[str], fingerprint: str, data_dir: str) -> None:
    """A UserError when the data differs from what a checkpoint (``stored``: its DataModule state) trained on."""
    was = stored.get("data_dir", "the run's data")
    if "classes" in stored and list(stored["classes"]) != classes:
        trained_on = ", ".join(stored["classes"])
        raise UserError(
            f"{data_dir} has the classes {', '.join(classes)}, but the run was trained on {trained_on} ({was}); "
            "pass the run's data (--data_dir), or restore the folder's class names, or start a new run"
        )
    if stored.get("fingerprint") not in (None, fingerprint):
        raise UserError(
            f"{data_dir} holds other images than the run was trained on ({was}): same classes, but images or their "
            "order differ; pass the run's data (--data_dir), or start a new run"
        )


class CIFARDataModule(L.LightningDataModule):
    """CIFAR-10 or CIFAR-100 from torchvision's files, or an image folder, with a stratified validation hold-out.

    ``dataset`` picks the source: ``cifar10`` / ``cifar100`` are torchvision's files in ``data_dir``
    (downloaded in ``prepare_data`` when missing), ``imagefolder`` is ``data_dir/train/<class>/*`` (and
    optional ``data_dir/test/<class>/*``); ``auto`` is the image folder when ``data_dir/train`` exists, else
    CIFAR-10. Batches are normalised with the data set's own training statistics (CIFAR-10's for image
    folders, see :meth:`normalization_stats`).
    ``val_size`` images of the training set, stratified by class and fixed by ``seed``, validate;
    ``val_size=0`` validates on the test split instead. Batches leave the loader as uint8 and are
    augmented (training) or normalised (evaluation) after they reach their device.
    """

    def __init__(self, config: DataConfig | str | os.PathLike[str] | None = None, **options: Any) -> None:
        """``CIFARDataModule("path/to/data", batch_size=256)`` or ``CIFARDataModule(DataConfig(...))``: every option
        of :class:`~cifar_resnet.config.DataConfig` (defaults and checks there)."""
        super().__init__()
        if isinstance(config, str | os.PathLike):
            config, options = None, {"data_dir": os.fspath(config), **options}
        try:
            config = dataclasses.replace(config or DataConfig(), **upgrade_names(options))
        except TypeError as err:  # an unknown keyword
            raise TypeError(f"CIFARDataModule: {err}; see cifar_resnet.config.DataConfig") from None
        self.config = config
        self.save_hyperparameters(as_dict(config))
        self.data_dir = Path(config.data_dir)
        self.source = resolve_dataset(config.dataset, config.data_dir)
        self.cache_dir = Path(config.cache_dir) if config.cache_dir else default_cache_dir()
        self.augment_config = AugmentConfig(
            random_resized_crop=config.random_resized_crop,
            crop_padding=config.crop_padding,
            hflip=config.hflip,
            color_jitter=config.color_jitter,
            cutout=config.cutout,
            policy=config.policy,
            randaugment_num_ops=config.randaugment_num_ops,
            randaugment_magnitude=config.randaugment_magnitude,
        )
        mean, std = self.normalization_stats()
        self.train_augment = BatchAugment(self.augment_config, mean, std)
        self.normalize = Normalize(mean, std)
        self.train_split: ImageSplit | None = None
        self.val_split: ImageSplit | None = None
        self.test_split: ImageSplit | None = None
        self.fingerprint = ""
        self._resident: dict[tuple[str, str], ImageSplit] = {}
        self._train_loader: TrainingLoader | None = None
        self._resume_epoch = 0

    # ------------------------------------------------------------------ data

    def normalization_stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """The per-channel mean and std of the source's training images: CIFAR-10's or CIFAR-100's published
        values; image folders use CIFAR-10's, so a folder run normalises the same whatever its split or its
        images (and resumes of earlier folder runs stay exact); ``--describe_data`` prints a folder's own."""
        spec = TORCHVISION_SETS.get(self.source)
        return (spec.mean, spec.std) if spec is not None else (CIFAR10_MEAN, CIFAR10_STD)

    @property
    def num_classes(self) -> int:
        """Number of classes, known without decoding any image."""
        if self.source in TORCHVISION_SETS:
            return TORCHVISION_SETS[self.source].num_classes
        return len(class_names(self.data_dir / "train"))

    @property
    def has_test_split(self) -> bool:
        return self.source in TORCHVISION_SETS or (self.data_dir / "test").is_dir()

    def prepare_data(self) -> None:
        """Download torchvision's files when missing, or decode an image folder into the cache; once per node."""
        if self.source in TORCHVISION_SETS:
            download(self.data_dir, self.source)
        else:
            for split in ("train", "test"):
                if (self.data_dir / split).is_dir():
                    load_image_folder(self.data_dir / split, self.cache_dir)

    def _load(self, train: bool) -> ImageSplit:
        if self.source in TORCHVISION_SETS:
            return load_torchvision(self.data_dir, train=train, dataset=self.source)
        return load_image_folder(self.data_dir / ("train" if train else "test"), self.cache_dir)

    def load_test_split(self) -> ImageSplit | None:
        """The test split alone, without decoding the training images (None where there is none)."""
        if self.test_split is not None:
            return self.test_split
        return self._load(train=False) if self.has_test_split else None

    def setup(self, stage: str | None = None) -> None:
        """Load the splits (idempotent: a second call keeps what is loaded)."""
        if self.train_split is not None:
            return
        full_train = self._load(train=True)
        self.fingerprint = data_fingerprint(full_train)
        self.test_split = self._load(train=False) if self.has_test_split else None
        if self.test_split is not None and self.test_split.classes != full_train.classes:
            raise UserError(f"test classes {self.test_split.classes} differ from train classes {full_train.classes}")
        val_size = self.config.val_size
        if val_size == 0:
            if self.test_split is None:
                raise UserError(f"--val_size 0 validates on the test split, but {self.data_dir}/test is missing")
            train, val = full_train, self.test_split
        else:
            if val_size >= len(full_train):
                raise UserError(
                    f"--val_size {val_size} leaves no training images (the training set has {len(full_train)})"
                )
            train_idx, val_idx = stratified_split(full_train.labels, val_size, self.config.seed)
            train, val = full_train.subset(train_idx), full_train.subset(val_idx)
        # Classes in turn, so validating on the first batches only (--limit_val_batches) still sees them all.
        self.train_split, self.val_split = train, val.subset(interleave_by_class(val.labels))
        if stage in (None, "fit"):
            self._check_training_batches()

    def _check_training_batches(self) -> None:
        """A UserError when an epoch would hold no training batch (the loader drops an incomplete last batch)."""
        assert self.train_split is not None
        world, _ = self._world()
        per_process = len(self.train_split) // world
        batches = per_process // self.config.batch_size
        if batches == 0:
            raise UserError(
                f"--batch_size {self.config.batch_size} is larger than the training split"
                f"{' per process' if world > 1 else ''} ({per_process} images): no batch to train on; lower "
                "--batch_size (or --val_size)"
            )
        limit = self.trainer.limit_train_batches if self.trainer is not None else None
        if isinstance(limit, float) and int(batches * limit) == 0:
            raise UserError(
                f"--limit_train_batches {limit} of {batches} training batches leaves none; raise it (or give a number "
                "of batches)"
            )

    @property
    def classes(self) -> tuple[str, ...]:
        assert self.train_split is not None, "call setup() first"
        return self.train_split.classes

    # ------------------------------------------------------------------ loaders

    def _world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)

    def _current_epoch(self) -> int:
        """The epoch the next training iteration belongs to (0 outside a trainer).

        On resume Lightning creates the loader's iterator before it restores its loop counters, so the
        epoch saved by :meth:`state_dict` is the floor until the loop catches up.
        """
        if self.trainer is None:
            return 0
        return max(self.trainer.fit_loop.epoch_progress.current.processed, self._resume_epoch)

    def state_dict(self) -> dict[str, Any]:
        """The epoch a resumed run starts (or continues) in, and what the run trains on: the class names and
        a fingerprint of the training images in their order."""
        processed = self.trainer.fit_loop.epoch_progress.current.processed if self.trainer is not None else 0
        state: dict[str, Any] = {"next_epoch": int(processed)}
        if self.train_split is not None:
            state.update(classes=list(self.classes), fingerprint=self.fingerprint, data_dir=str(self.data_dir))
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue from a checkpoint: refuse data other than the run's (checked after :meth:`setup`)."""
        self._resume_epoch = int(state_dict.get("next_epoch", 0))
        if self.train_split is not None:
            check_same_data(state_dict, list(self.classes), self.fingerprint, str(self.data_dir))

    def loader(self, name: str, device: torch.device | None = None) -> DataLoader:
        """The ``train``, ``val`` or ``test`` loader for a run on ``device`` (default: the trainer's, else the CPU).

        On a CUDA device the split is kept on the GPU (unless ``data_on_device`` is off), as in training.
        """
        split: ImageSplit | None = getattr(self, f"{name}_split")
        train = name == "train"
        if split is None:
            raise UserError(f"no test split: add {self.data_dir}/test/<class>/* or use torchvision's CIFAR-10/100")
        world, rank = self._world()
        if device is None:
            device = self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
        on_gpu = device.type == "cuda"
        resident = on_gpu and self.config.data_on_device
        if resident:
            # CIFAR-10 is 150 MB as uint8: keep it on the GPU and index batches there, no host copies at all.
            key = (name, str(device))
            if key not in self._resident:
                self._resident[key] = ImageSplit(split.images.to(device), split.labels.to(device), split.classes)
            split = self._resident[key]
        dataset = TensorImageDataset(split)
        workers = 0 if resident else self.config.num_workers
        common = {"num_workers": workers, "collate_fn": keep_batch, "pin_memory": on_gpu and not resident,
                  "persistent_workers": workers > 0,
                  "worker_init_fn": partial(worker_init, os.getpid(), rank) if workers > 0 else None}  # fmt: skip
        if train:
            # Training order comes from (seed, epoch); one process is simply a world of one.
            batches = EpochBatchSampler(len(dataset), self.config.batch_size, world, rank, self.config.seed,
                                        self._current_epoch, pin_memory=resident, as_lists=workers > 0)  # fmt: skip
            self._train_loader = TrainingLoader(dataset, batch_sampler=batches, **common)
            return self._train_loader
        # Evaluation splits are not padded, so every image counts exactly once however many processes share them.
        sampler = UnrepeatedDistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=False)
        return TensorBatchLoader(dataset, batch_size=self.config.eval_batch_size, sampler=sampler, **common)

    def predict_dataloader(self) -> DataLoader:
        """The test split where there is one, else the validation split (for ``trainer.predict``)."""
        return self.loader("test" if self.test_split is not None else "val")

    def normalization(self) -> dict[str, list[float]]:
        """The per-channel mean and std batches are normalised with (stored in checkpoints for the tools)."""
        return {"mean": [float(v) for v in self.normalize.mean.flatten()],
                "std": [float(v) for v in self.normalize.std.flatten()]}  # fmt: skip

    def train_dataloader(self) -> DataLoader:
        return self.loader("train")

    def val_dataloader(self) -> DataLoader:
        return self.loader("val")

    def test_dataloader(self) -> DataLoader:
        return self.loader("test")

    # ------------------------------------------------------------------ augmentation

    def augmentation_generator(self, epoch: int, rank: int = 0, batch: int = 0) -> torch.Generator:
        """The augmentation RNG of one batch, derived from (seed, epoch, rank, batch) alone: a run resumed in
        the middle of an epoch draws for each remaining batch exactly what the uninterrupted run drew."""
        seed = ((self.config.seed * 1_000_003 + epoch) * 4099 + rank) * 1_000_033 + batch
        return torch.Generator().manual_seed(seed % (2**63))

    def augment_batch(self, images: torch.Tensor, epoch: int, rank: int = 0, batch: int = 0) -> torch.Tensor:
        """The training transform of one batch (without MixUp / CutMix, which need the labels)."""
        return self.train_augment(images, self.augmentation_generator(epoch, rank, batch))

    @property
    def mixes(self) -> bool:
        """Whether training batches are mixed (MixUp or CutMix)."""
        return self.config.mixup > 0 or self.config.cutmix > 0

    def training_batch(
        self, images: torch.Tensor, labels: torch.Tensor, epoch: int, rank: int = 0, batch: int = 0
    ) -> tuple[torch.Tensor, ...]:
        """The training transform of one batch: ``(images, labels)``, and with MixUp / CutMix on, ``(images,
        labels, lam)`` where ``lam`` is a float32 device tensor holding, per image, the weight of its own label
        (its partner is the image before it; one λ per batch, repeated so the batch has one length). λ and
        CutMix's box are drawn on the host from the batch's generator after the augmentation's draws, so a
        resumed run mixes each batch as the uninterrupted one did.
        """
        gen = self.augmentation_generator(epoch, rank, batch)
        images = self.train_augment(images, gen)
        if not self.mixes:
            return images, labels
        plan = draw_mix(images.shape[-2], images.shape[-1], gen, self.config.mixup, self.config.cutmix)
        lam = to_device(torch.full((images.shape[0],), plan.lam, dtype=torch.float32), images.device)
        return mix_images(images, plan), labels, lam

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        images, labels = batch
        trainer = self.trainer
        if trainer is not None and trainer.training:
            position = self._train_loader.position if self._train_loader is not None else 0
            return self.training_batch(images, labels, trainer.current_epoch, trainer.global_rank, position)
        return self.normalize(images), labels

    def preview_indices(self, count: int = 64, seed: int = 0) -> torch.Tensor:
        """``count`` training images drawn with ``seed``, classes in turn: a preview shows the data, not the first
        images of the first class."""
        assert self.train_split is not None, "call setup() first"
        drawn = torch.randperm(len(self.train_split), generator=torch.Generator().manual_seed(seed))
        return drawn[interleave_by_class(self.train_split.labels[drawn])][:count]

    def augmented_preview(self, count: int = 64, seed: int = 0) -> torch.Tensor:
        """``count`` training images (:meth:`preview_indices`) augmented (policy and mixing included) as in
        training, in [0, 1] for display."""
        assert self.train_split is not None, "call setup() first"
        images = self.train_split.images[self.preview_indices(count, seed)]
        gen = torch.Generator().manual_seed(seed)
        augmented = self.train_augment(images, gen)
        if self.mixes:
            plan = draw_mix(images.shape[-2], images.shape[-1], gen, self.config.mixup, self.config.cutmix)
            augmented = mix_images(augmented, plan)
        return self.normalize.denormalize(augmented)

    def describe(self) -> str:
        """One line naming the source, the split sizes and the augmentation."""
        parts = [f"source={self.source} ({self.data_dir})"]
        for name in ("train", "val", "test"):
            split = getattr(self, f"{name}_split")
            parts.append(f"{name}={len(split) if split is not None else 'none'}")
        mixing = [
            f"{name} alpha {alpha:g}"
            for name, alpha in (("MixUp", self.config.mixup), ("CutMix", self.config.cutmix))
            if alpha > 0
        ]
        parts.append(f"augment: {', '.join([self.augment_config.describe(), *mixing])}")
        return ", ".join(parts)
