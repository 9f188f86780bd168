"""Throughput of our data pipeline and training step, against what a user would otherwise write.

Every figure is images per second over timed iterations that follow untimed warm-up iterations; on CUDA
the device is synchronised before each clock read, so queued work is counted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
import torchvision
from torch.autograd.profiler_util import EventList
from torch.utils.data import DataLoader
from torchvision import transforms

from cifar_resnet.config import TrainerConfig
from cifar_resnet.data import CIFAR10_MEAN, CIFAR10_STD, CIFARDataModule
from cifar_resnet.errors import UserError
from cifar_resnet.models import create_model
from cifar_resnet.training.module import ImageClassifier
from cifar_resnet.training.schedule import LRSchedule
from cifar_resnet.training.trainer import RunLabel, build_trainer


@dataclass
class Figure:
    """One measured number."""

    name: str
    value: float
    unit: str
    device: str
    details: dict[str, Any]

    def json_line(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cycle(loader: DataLoader) -> Iterator[Any]:
    while True:
        yield from loader


def _time_iterations(
    step: Callable[[], int], warmup: int, iterations: int, device: torch.device, repeats: int = 5
) -> float:
    """Images per second of ``step`` (which returns how many images it handled) after ``warmup`` calls.

    The median of ``repeats`` timed runs, so one burst of load from elsewhere does not decide the figure.
    """
    for _ in range(warmup):
        step()
    rates = []
    for _ in range(repeats):
        _sync(device)
        start, images = time.perf_counter(), 0
        for _ in range(iterations):
            images += step()
        _sync(device)
        rates.append(images / (time.perf_counter() - start))
    return statistics.median(rates)


def our_pipeline(dm: CIFARDataModule, device: torch.device, warmup: int, iterations: int) -> float:
    """Augmented training images per second: our loader for ``device`` (on a GPU the data lives there, as in
    training), the copy to ``device`` where it does not, and batch augmentation."""
    batches = _cycle(dm.loader("train", device))

    def step() -> int:
        images, labels = next(batches)
        images = images.to(device, non_blocking=True)
        dm.augment_batch(images, epoch=0)
        return labels.shape[0]

    return _time_iterations(step, warmup, iterations, device)


# The augmentation recipes scripts/benchmark.py --recipes times, as DataConfig options over the defaults
# (4-pixel crop and flip): the baseline, each policy, and MixUp / CutMix at alpha 1.
RECIPES: dict[str, dict[str, Any]] = {
    "crop+flip": {},
    "autoaugment": {"policy": "autoaugment"},
    "randaugment": {"policy": "randaugment"},
    "trivialaugment": {"policy": "trivialaugment"},
    "mixup": {"mixup": 1.0},
    "cutmix": {"cutmix": 1.0},
    "trivialaugment+cutout16+mixup+cutmix": {"policy": "trivialaugment", "cutout": 16, "mixup": 1.0, "cutmix": 1.0},
}


def recipe_augmentation(
    dm: CIFARDataModule, options: dict[str, Any], device: torch.device, warmup: int, iterations: int, batches: int = 8
) -> float:
    """Images per second of the training transform with ``options`` (``training_batch``: augmentation, the
    policy, and MixUp / CutMix with their per-batch draws) on ``batches`` real training batches held on
    ``device``, as a run with the data on the device has them."""
    assert dm.train_split is not None, "call setup() first"
    variant = CIFARDataModule(dataclasses.replace(dm.config, **options))
    size = dm.config.batch_size
    count = min(batches, len(dm.train_split) // size)
    images = dm.train_split.images[: count * size].to(device).view(count, size, *dm.train_split.images.shape[1:])
    labels = dm.train_split.labels[: count * size].to(device).view(count, size)
    taken = [0]

    def step() -> int:
        index = taken[0] % count
        variant.training_batch(images[index], labels[index], epoch=0, batch=taken[0])
        taken[0] += 1
        return size

    return _time_iterations(step, warmup, iterations, device)


def pil_pipeline(
    data_dir: Path, batch_size: int, workers: int, device: torch.device, warmup: int, iterations: int
) -> float:
    """The usual tutorial pipeline: ImageFolder (or CIFAR10) through PIL transforms and a DataLoader."""
    transform = transforms.Compose(
        [
            transforms.RandomCrop(32, padding=4),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(CIFAR10_MEAN, CIFAR10_STD),
        ]
    )
    if (data_dir / "train").is_dir():
        dataset = torchvision.datasets.ImageFolder(str(data_dir / "train"), transform=transform)
    else:
        dataset = torchvision.datasets.CIFAR10(str(data_dir), train=True, transform=transform)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
        drop_last=True,
    )
    batches = _cycle(loader)

    def step() -> int:
        images, labels = next(batches)
        images.to(device, non_blocking=True)
        return labels.shape[0]

    return _time_iterations(step, warmup, iterations, device)


class _StepTimer(L.Callback):
    """Times training batches ``warmup`` .. end, synchronising the device at both ends."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.start = 0.0
        self.end = 0.0
        self.images = 0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        if idx == self.warmup:
            _sync(pl_module.device)
            self.start = time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        if idx >= self.warmup:
            self.images += batch[1].shape[0]
        if idx + 1 == trainer.num_training_batches:
            _sync(pl_module.device)
            self.end = time.perf_counter()


def _fit_steps(
    arch: str,
    dm: CIFARDataModule,
    device: torch.device,
    precision: str,
    channels_last: bool,
    compile_model: bool,
    steps: int,
    callback: L.Callback,
    cuda_graphs: bool = True,
) -> None:
    """Train ``steps`` batches through our LightningModule and the Trainer of ``scripts/fit.py``; ``cuda_graphs``
    as ``--cuda_graphs`` (on a GPU, False times the eager step)."""
    model = ImageClassifier(arch=arch, num_classes=dm.num_classes, channels_last=channels_last,
                            compile=compile_model, cuda_graphs=cuda_graphs)  # fmt: skip
    with tempfile.TemporaryDirectory() as log_dir:
        config = TrainerConfig(max_epochs=1, log_dir=log_dir, accelerator=device.type, devices=1, precision=precision,
                               limit_train_batches=steps, limit_val_batches=0, progress="none")  # fmt: skip
        trainer, _ = build_trainer(config, RunLabel(arch))  # the callbacks and logger of scripts/fit.py
        trainer.callbacks.append(callback)
        trainer.fit(model, datamodule=dm)


def lightning_training(
    arch: str,
    dm: CIFARDataModule,
    device: torch.device,
    precision: str,
    channels_last: bool,
    compile_model: bool,
    warmup: int,
    iterations: int,
    cuda_graphs: bool = True,
) -> float:
    """Training images per second through our LightningModule and a Trainer, as ``scripts/fit.py`` runs it."""
    timer = _StepTimer(warmup)
    _fit_steps(arch, dm, device, precision, channels_last, compile_model, warmup + iterations, timer, cuda_graphs)
    if timer.images == 0:
        raise UserError(_too_few_batches(dm, warmup))
    return timer.images / (timer.end - timer.start)


def _too_few_batches(dm: CIFARDataModule, warmup: int) -> str:
    return (
        f"an epoch has only {len(dm.loader('train'))} training batches, not more than --warmup {warmup}; "
        "lower --warmup or --batch_size"
    )


@dataclass
class OpTime:
    """One operator's share of the profiled steps: self time on the device (CUDA) or the CPU."""

    name: str
    self_ms: float
    share: float
    calls: int


class _StepProfiler(L.Callback):
    """Runs torch.profiler over training batches ``warmup`` .. end (CPU ops, and CUDA kernels on a GPU).

    The profiler starts at the first batch, before the step's graph is warmed up and captured, and records from
    batch ``warmup`` on (its schedule's warm-up before that): CUPTI sees the kernels of a CUDA graph's replays
    only when it was set up before the capture, so a profiler started after it may miss them.
    """

    def __init__(self, warmup: int, steps: int, device: torch.device) -> None:
        self.warmup = warmup
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        schedule = torch.profiler.schedule(wait=0, warmup=warmup, active=steps, repeat=1)
        self.profiler = torch.profiler.profile(activities=activities, schedule=schedule)
        self.started = False

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        if idx == 0:
            self.profiler.start()
        if idx == self.warmup:
            _sync(pl_module.device)
            self.started = True

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        if idx + 1 == self.warmup:
            _sync(pl_module.device)  # the recorded window starts with no earlier work queued
        if idx + 1 == trainer.num_training_batches:
            _sync(pl_module.device)
        self.profiler.step()
        if idx + 1 == trainer.num_training_batches:
            self.profiler.stop()


def profile_training(
    arch: str,
    dm: CIFARDataModule,
    device: torch.device,
    precision: str,
    channels_last: bool,
    warmup: int,
    steps: int,
    top: int = 10,
    trace: Path | None = None,
    cuda_graphs: bool = True,
) -> tuple[list[OpTime], str]:
    """Where the time of ``steps`` training batches goes: the ``top`` operators by self time, and the table.

    On CUDA the ranking is by kernel time on the GPU, on the CPU by CPU time. ``trace`` receives a Chrome
    trace (open it in chrome://tracing or Perfetto).
    """
    probe = _StepProfiler(warmup, steps, device)
    _fit_steps(arch, dm, device, precision, channels_last, False, warmup + steps, probe, cuda_graphs)
    if not probe.started:
        raise UserError(_too_few_batches(dm, warmup))
    on_gpu = device.type == "cuda"
    # The schedule's per-step ranges (ProfilerStep#N) enclose the operators: a label, not an operator of their own.
    averages = EventList([e for e in probe.profiler.key_averages() if not e.key.startswith("ProfilerStep")])
    attribute = "self_device_time_total" if on_gpu else "self_cpu_time_total"
    total = sum(getattr(event, attribute) for event in averages) or 1.0
    ranked = sorted(averages, key=lambda event: getattr(event, attribute), reverse=True)[:top]
    ops = [OpTime(e.key, getattr(e, attribute) / 1e3, getattr(e, attribute) / total, e.count) for e in ranked]
    if trace is not None:
        probe.profiler.export_chrome_trace(str(trace))
    return ops, averages.table(sort_by=attribute, row_limit=top)


def _plain_step(
    arch: str, dm: CIFARDataModule, device: torch.device, precision: str, channels_last: bool, steps: int
) -> tuple[torch.nn.Module, Callable[[torch.Tensor, torch.Tensor], None], Callable[[int], None]]:
    """A hand-written step with the arithmetic of ours (fused SGD reading a tensor LR, the closed-form cosine),
    as a function of static tensors, and the LR setter to call before it."""
    model = create_model(arch, num_classes=dm.num_classes).to(device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model.to(memory_format=memory_format).train()
    lr = torch.full((), 0.1, device=device)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, fused=True)
    schedule = LRSchedule.for_run(0.1, steps, 1)
    autocast_dtype = torch.bfloat16 if precision.startswith("bf16") else torch.float16
    use_autocast = precision in ("bf16-mixed", "16-mixed")

    def step(images: torch.Tensor, labels: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=False)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=use_autocast, cache_enabled=False):
            loss = F.cross_entropy(model(images.contiguous(memory_format=memory_format)), labels)
        loss.backward()
        optimizer.step()

    return model, step, lambda index: lr.fill_(schedule(index))


def plain_training(
    arch: str,
    dm: CIFARDataModule,
    device: torch.device,
    precision: str,
    channels_last: bool,
    warmup: int,
    iterations: int,
) -> float:
    """The same model, data, augmentation, fused SGD and cosine schedule in a hand-written eager loop."""
    if precision == "16-mixed":
        raise UserError("the plain loops have no loss scaling; use --precision bf16-mixed or 32-true")
    _, step, set_lr = _plain_step(arch, dm, device, precision, channels_last, warmup + iterations)
    batches = _cycle(dm.loader("train", device))  # the same loader the Trainer gets on this device
    taken = [0]

    def one() -> int:
        images, labels = next(batches)
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        set_lr(taken[0])
        step(dm.augment_batch(images, epoch=0), labels)
        taken[0] += 1
        return labels.shape[0]

    return _time_iterations(one, warmup, iterations, device, repeats=1)


def graphed_plain_training(
    arch: str,
    dm: CIFARDataModule,
    device: torch.device,
    precision: str,
    channels_last: bool,
    warmup: int,
    iterations: int,
) -> float:
    """The ceiling: the plain loop's step captured as one CUDA graph and replayed (augmentation outside it).

    Written out with torch.cuda.CUDAGraph as torch's notes show it, apart from the project's own graph code,
    so the comparison with our Lightning step measures everything our path adds around the GPU's work.
    """
    if device.type != "cuda":
        raise UserError("the CUDA-graphed loop needs a CUDA device")
    _, step, set_lr = _plain_step(arch, dm, device, precision, channels_last, warmup + iterations + 4)
    batches = _cycle(dm.loader("train", device))

    def augmented() -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = next(batches)
        return dm.augment_batch(images, epoch=0), labels

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for index in range(3):  # eager warm-up before capture: cuDNN autotuning, optimizer state
            set_lr(index)
            step(*augmented())
    torch.cuda.current_stream().wait_stream(side)
    static_images, static_labels = augmented()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(static_images, static_labels)
    taken = [3]

    def one() -> int:
        images, labels = augmented()
        static_images.copy_(images)
        static_labels.copy_(labels)
        set_lr(taken[0])
        graph.replay()
        taken[0] += 1
        return labels.shape[0]

    return _time_iterations(one, warmup, iterations, device, repeats=1)


class _SyncCounter(L.Callback):
    """Counts CUDA host-device synchronisations (torch's sync debug mode) in training batches ``warmup`` up to
    the epoch's second-to-last; the last one reads the epoch's figures, which is meant to sync."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.steps = 0
        self.syncs = 0
        self._caught: Any = None
        self._records: list[Any] = []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        if idx == self.warmup:
            self._caught = warnings.catch_warnings(record=True)
            self._records = self._caught.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        if self._caught is None:
            return
        self.steps += 1
        if idx + 2 == trainer.num_training_batches:
            torch.cuda.set_sync_debug_mode("default")
            self._caught.__exit__(None, None, None)
            self._caught = None
            self.syncs = sum("synchroniz" in str(record.message) for record in self._records)


def host_syncs_per_step(
    arch: str, dm: CIFARDataModule, device: torch.device, precision: str, channels_last: bool, warmup: int, steps: int,
    cuda_graphs: bool = True,
) -> float:  # fmt: skip
    """Host-device synchronisations per training step of the real fit path, on CUDA."""
    counter = _SyncCounter(warmup)
    _fit_steps(arch, dm, device, precision, channels_last, False, warmup + steps + 1, counter, cuda_graphs)
    return counter.syncs / max(counter.steps, 1)


class _EpochGap(L.Callback):
    """Time from the end of an epoch's last training batch to the start of the next epoch's first one."""

    def __init__(self) -> None:
        self.gaps: list[float] = []
        self._ended = 0.0

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        if idx + 1 == trainer.num_training_batches:
            _sync(pl_module.device)
            self._ended = time.perf_counter()

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        if idx == 0 and self._ended:
            _sync(pl_module.device)
            self.gaps.append(time.perf_counter() - self._ended)


def epoch_overhead(
    arch: str, dm: CIFARDataModule, device: torch.device, precision: str, channels_last: bool, steps: int,
    cuda_graphs: bool = True,
) -> float:  # fmt: skip
    """Seconds between two epochs' training batches in ``scripts/fit.py``'s Trainer: validation of the whole
    validation split, checkpoints, the confusion matrix, logging and progress; the second gap of a 3-epoch
    run, so one-time costs (the first figure, the first validation's warm-up) are left out."""
    gap = _EpochGap()
    with tempfile.TemporaryDirectory() as log_dir:
        model = ImageClassifier(arch=arch, num_classes=dm.num_classes, channels_last=channels_last,
                                cuda_graphs=cuda_graphs)  # fmt: skip
        config = TrainerConfig(max_epochs=3, log_dir=log_dir, accelerator=device.type, devices=1,
                               precision=precision, limit_train_batches=steps, progress="lines")  # fmt: skip
        trainer, _ = build_trainer(config, RunLabel(arch))
        trainer.callbacks.append(gap)
        with contextlib.redirect_stdout(io.StringIO()):
            trainer.fit(model, datamodule=dm)
    return gap.gaps[-1]


@dataclass(frozen=True)
class SaveCost:
    """What one checkpoint save costs: the training thread's share, and the write that runs beside training."""

    training_thread_ms: float  # median over the timed saves
    background_write_ms: float  # median; the next save waits for it only if it comes sooner
    megabytes: float


def checkpoint_save_cost(arch: str, device: torch.device, saves: int) -> SaveCost:
    """Time ``saves`` checkpoint saves of ``arch``'s state as ``fit.py`` writes them (weights, buffers and SGD momentum
    through its background checkpoint IO), after one untimed save that allocates the host buffers."""
    from cifar_resnet.training.reliability import BackgroundCheckpointIO

    model = create_model(arch).to(device)
    momentum = {i: {"momentum_buffer": torch.randn_like(p)} for i, p in enumerate(model.parameters())}
    checkpoint = {
        "global_step": 0,
        "state_dict": {f"model.{name}": value for name, value in model.state_dict().items()},
        "optimizer_states": [{"state": momentum, "param_groups": [{"lr": 0.1}]}],
    }
    writer = BackgroundCheckpointIO()
    on_thread, in_background = [], []
    with tempfile.TemporaryDirectory() as folder:
        target = Path(folder) / "last.ckpt"
        for index in range(saves + 1):
            _sync(device)
            start = time.perf_counter()
            writer.save_checkpoint(checkpoint, target)
            returned = time.perf_counter()
            writer.wait()
            if index:
                on_thread.append(returned - start)
                in_background.append(time.perf_counter() - returned)
        writer.teardown()
        size = target.stat().st_size
    return SaveCost(1000 * statistics.median(on_thread), 1000 * statistics.median(in_background), size / 1e6)
