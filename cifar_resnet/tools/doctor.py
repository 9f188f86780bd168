"""Checks that the training path works on this machine: ``python -m cifar_resnet doctor``.

On synthetic images held in memory (no data set needed), through the real LightningModule and the Trainer that
``scripts/fit.py`` builds, it checks that

* the graphed step trains as the eager step does, from the same initial state (on the CPU the graph is
  :class:`~cifar_resnet.training.step.EagerReplayBackend`, the stand-in that records and replays eagerly);
* the step reads nothing back from the device beyond its designed reads (the logged loss every
  ``log_every_n_steps`` steps, the divergence flag every 50), without and with ``--ema``;
* a resume continues the same run: N steps, a checkpoint, a fresh module and Trainer, M more steps, against
  N+M uninterrupted;

and it times a checkpoint save as the training thread sees it and, on CUDA, measures our step against the plain
loop captured as one CUDA graph (the ceiling) at batch 128 and 512 for resnet18 and resnet50.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from cifar_resnet import environment
from cifar_resnet.cli.quiet import quiet_lightning
from cifar_resnet.config import DataConfig, TrainerConfig
from cifar_resnet.data import CIFARDataModule
from cifar_resnet.data.sources import ImageSplit
from cifar_resnet.fileio import atomic_write_text
from cifar_resnet.tools import benchmark
from cifar_resnet.training.module import ImageClassifier
from cifar_resnet.training.step import SYNCING_OPS, CUDAGraphBackend, EagerReplayBackend, GraphBackend, error_line
from cifar_resnet.training.trainer import RunLabel, build_trainer

PASS, FAIL, SKIPPED = "pass", "fail", "skipped"
# Graphed and eager weights after a few steps, as the relative L2 distance over every weight and buffer: equal
# bits where the graph is the CPU stand-in; on CUDA, where cuDNN may pick other algorithms for the two fits, a
# tight bound in fp32 and a looser one where the step runs in 16-bit floats.
TOLERANCE = {"cpu": 0.0, "32-true": 1e-4, "other": 2e-2}
# Our step as a fraction of the CUDA-graphed plain loop's images per second (docs/BENCHMARKS.md's target).
CEILING_SHARE = 0.9
DIVERGENCE_CHECK_EVERY = 50  # DivergenceStop's default: one host read every 50 steps


@dataclass
class Check:
    """One row of the doctor's table."""

    name: str
    status: str
    detail: str
    figures: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Plan:
    """What the doctor trains: the architecture, batch, steps an epoch (two epochs a fit) and precision."""

    device: torch.device
    precision: str
    arch: str = "resnet20"
    batch_size: int = 8
    steps_per_epoch: int = 5
    log_every_n_steps: int = 2
    speed_archs: tuple[str, ...] = ("resnet18", "resnet50")
    speed_batches: tuple[int, ...] = (128, 512)
    speed_warmup: int = 10
    speed_iterations: int = 50

    @classmethod
    def for_device(cls, device: torch.device, precision: str) -> Plan:
        if device.type == "cuda":  # 60 steps a fit: the divergence check's read at step 50 is counted too
            return cls(device, precision, arch="resnet18", batch_size=128, steps_per_epoch=30, log_every_n_steps=4)
        return cls(device, precision)

    @property
    def steps(self) -> int:
        return 2 * self.steps_per_epoch


class SyntheticDataModule(CIFARDataModule):
    """Seeded random 32x32 images in 10 classes, in memory: the doctor needs no data set on disk."""

    def __init__(self, train_images: int, batch_size: int, seed: int = 0) -> None:
        super().__init__(DataConfig(dataset="cifar10", data_dir="synthetic", batch_size=batch_size, val_size=20,
                                    seed=seed))  # fmt: skip
        generator = torch.Generator().manual_seed(seed)
        count = train_images + 20
        images = torch.randint(0, 256, (count, 3, 32, 32), dtype=torch.uint8, generator=generator)
        self._split = ImageSplit(images, torch.arange(count) % 10, tuple(f"class{i}" for i in range(10)))

    @property
    def has_test_split(self) -> bool:
        return False

    def prepare_data(self) -> None:
        """Nothing to download or decode."""

    def _load(self, train: bool) -> ImageSplit:
        return self._split


class _StoppedAfterSaveError(Exception):
    """Ends a fit once its checkpoint is saved (the doctor's own stop, outside any user-facing path)."""


class _SaveAndStop(L.Callback):
    """At the end of step ``step``: save a checkpoint with ``trainer.save_checkpoint`` and time the call."""

    def __init__(self, step: int, path: Path) -> None:
        self.step, self.path, self.seconds = step, path, 0.0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, idx: int) -> None:
        if trainer.global_step == self.step:
            start = time.perf_counter()
            trainer.save_checkpoint(self.path)
            self.seconds = time.perf_counter() - start
            raise _StoppedAfterSaveError


class _HostReads(TorchDispatchMode):
    """Syncing operations (:data:`SYNCING_OPS`) per training step, from one batch's start to the next's.

    On CUDA an operation counts when one of its tensors is on the GPU; on the CPU every one counts, as each would
    make the host wait if the tensor were on a GPU.
    """

    def __init__(self, on_gpu: bool) -> None:
        super().__init__()
        self.on_gpu = on_gpu
        self.step: int | None = None
        self.reads: dict[int, list[str]] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = func.overloadpacket.__name__
        if self.step is not None and name in SYNCING_OPS and (not self.on_gpu or _on_gpu(args, kwargs)):
            self.reads.setdefault(self.step, []).append(f"{name} at {_caller()}")
        return func(*args, **(kwargs or {}))


_TORCH_DIR = str(Path(torch.__file__).parent)


def _caller() -> str:
    """The innermost frame outside torch's own package, as FILE:LINE (no source lines read: this runs per read)."""
    frames = traceback.StackSummary.extract(traceback.walk_stack(None), lookup_lines=False)
    outside = next((f for f in frames if not f.filename.startswith(_TORCH_DIR) and f.filename != __file__), None)
    return f"{Path(outside.filename).name}:{outside.lineno}" if outside is not None else "?"


def _on_gpu(args: Any, kwargs: Any) -> bool:
    values = [*args, *(kwargs or {}).values()]
    return any(isinstance(v, torch.Tensor) and v.device.type == "cuda" for v in values)


class _MarkSteps(L.Callback):
    """Tells :class:`_HostReads` which step runs; an epoch's last batch (it also reads the epoch's figures) and
    everything after training are left out."""

    def __init__(self, reads: _HostReads) -> None:
        self.reads = reads

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, idx: int) -> None:
        last = idx + 1 == trainer.num_training_batches
        self.reads.step = None if last else trainer.global_step

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.reads.step = None


class Doctor:
    """Runs the checks of one :class:`Plan`; ``say`` receives the progress lines."""

    def __init__(self, plan: Plan, work_dir: Path, say: Callable[[str], None] = print) -> None:
        self.plan = plan
        self.work_dir = work_dir
        self.say = say
        self.on_gpu = plan.device.type == "cuda"
        self._fits = 0
        images = plan.batch_size * plan.steps_per_epoch
        self._dm = lambda: SyntheticDataModule(images, plan.batch_size)

    # ------------------------------------------------------------------ fits

    def graph_backend(self) -> type[GraphBackend]:
        """CUDA graphs on a GPU, the eager stand-in elsewhere."""
        return CUDAGraphBackend if self.on_gpu else EagerReplayBackend

    def _module(self, graphed: bool, ema: float = 0.0) -> ImageClassifier:
        L.seed_everything(0, verbose=False)  # the same initial weights for every fit
        module = ImageClassifier(arch=self.plan.arch, num_classes=10, cuda_graphs=graphed, ema=ema)
        module.graph_backend = self.graph_backend()
        return module

    def _fit(self, module: ImageClassifier, callbacks: list[L.Callback], ckpt_path: Path | None = None) -> None:
        """Two epochs of the plan through the Trainer of ``scripts/fit.py`` (no validation)."""
        self._fits += 1
        config = TrainerConfig(max_epochs=2, log_dir=str(self.work_dir / f"fit{self._fits}"),
                               accelerator=self.plan.device.type, devices=1, precision=self.plan.precision,
                               limit_val_batches=0, progress="none", log_every_n_steps=self.plan.log_every_n_steps,
                               logger="csv")  # fmt: skip
        trainer, _ = build_trainer(config, RunLabel(self.plan.arch))
        for position, callback in enumerate(callbacks):
            trainer.callbacks.insert(position, callback)
        with contextlib.suppress(_StoppedAfterSaveError), _quiet_fit():
            trainer.fit(module, datamodule=self._dm(), ckpt_path=str(ckpt_path) if ckpt_path else None)

    def _train(self, graphed: bool, ema: float = 0.0) -> tuple[dict[str, torch.Tensor], _HostReads, dict[str, Any]]:
        """Weights after two epochs, the host reads of every step but an epoch's last, and the step mode."""
        reads = _HostReads(self.on_gpu)
        module = self._module(graphed, ema)
        with reads:
            self._fit(module, [_MarkSteps(reads)])
        return _weights(module), reads, dict(module.step_mode)

    # ------------------------------------------------------------------ checks

    def _compare(self, name: str, got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str) -> Check:
        distance = _relative_distance(got, want)
        bitwise = all(torch.equal(got[k], want[k]) for k in want)
        tolerance = self.tolerance()
        figures = {"relative_l2": distance, "bitwise": bitwise, "tolerance": tolerance}
        bound = "bitwise" if tolerance == 0 else f"relative L2 {distance:.2e} <= {tolerance:g}"
        if bitwise or (tolerance > 0 and distance <= tolerance):
            return Check(name, PASS, f"{what}: {'equal bits' if bitwise else bound}", figures)
        return Check(name, FAIL, f"{what} differ: relative L2 {distance:.2e} (allowed: {bound})", figures)

    def tolerance(self) -> float:
        if not self.on_gpu:
            return TOLERANCE["cpu"]
        return TOLERANCE["32-true"] if self.plan.precision == "32-true" else TOLERANCE["other"]

    def host_read_check(self, name: str, reads: _HostReads) -> Check:
        """Designed reads only: the logged loss every log_every_n_steps steps, the divergence flag every 50."""
        every = self.plan.log_every_n_steps
        unexpected = []
        for step in sorted(set(range(self.plan.steps)) - {self.plan.steps_per_epoch - 1, self.plan.steps - 1}):
            designed = int((step + 1) % every == 0) + int((step + 1) % DIVERGENCE_CHECK_EVERY == 0)
            seen = reads.reads.get(step, [])
            if len(seen) != designed:
                unexpected.append(f"step {step}: {len(seen)} (designed {designed}): {'; '.join(seen[:3])}")
        total = sum(len(r) for r in reads.reads.values())
        figures = {"reads": total, "steps": self.plan.steps - 2, "unexpected_steps": len(unexpected)}
        if unexpected:
            return Check(name, FAIL, f"host reads beyond the designed ones at {len(unexpected)} steps, first "
                         f"{unexpected[0]}", figures)  # fmt: skip
        return Check(name, PASS, f"{total} reads in {self.plan.steps - 2} steps, all designed (the loss every "
                     f"{every} steps, the divergence flag every {DIVERGENCE_CHECK_EVERY})", figures)  # fmt: skip

    def resume_checks(self, uninterrupted: dict[str, torch.Tensor]) -> list[Check]:
        """Save after N steps (timed), resume in a fresh module and Trainer, and compare with N+M uninterrupted."""
        stop = self.plan.steps_per_epoch + self.plan.steps_per_epoch // 2  # mid-epoch
        path = self.work_dir / "stopped.ckpt"
        saver = _SaveAndStop(stop, path)
        self._fit(self._module(graphed=True), [saver])
        if not path.is_file():
            failed = Check("checkpoint save", FAIL, f"trainer.save_checkpoint at step {stop} left no file")
            return [failed, Check("resume", SKIPPED, "no checkpoint to resume from")]
        megabytes = path.stat().st_size / 1e6
        saved = Check("checkpoint save", PASS, f"{saver.seconds * 1e3:.1f} ms on the training thread "
                      f"(trainer.save_checkpoint, {megabytes:.1f} MB, the project's checkpoint IO)",
                      {"ms": saver.seconds * 1e3, "mb": megabytes})  # fmt: skip
        resumed = self._module(graphed=True)
        self._fit(resumed, [], ckpt_path=path)
        what = f"{stop} steps, a checkpoint, {self.plan.steps - stop} more in a new Trainer, against {self.plan.steps}"
        return [saved, self._compare("resume", _weights(resumed), uninterrupted, what)]

    def speed_checks(self) -> list[Check]:
        """Our step against the CUDA-graphed plain loop, per arch and batch (CUDA only)."""
        rows = []
        for arch in self.plan.speed_archs:
            for batch in self.plan.speed_batches:
                name = f"speed {arch} bs{batch}"
                if not self.on_gpu:
                    rows.append(Check(name, SKIPPED, "needs CUDA"))
                    continue
                self.say(f"doctor: timing {arch} at batch {batch} against the CUDA-graphed plain loop ...")
                try:
                    rows.append(self._speed(name, arch, batch))
                except Exception as err:
                    rows.append(Check(name, FAIL, f"raised {error_line(err)}"))
        return rows

    def _speed(self, name: str, arch: str, batch: int) -> Check:
        p = self.plan
        dm = SyntheticDataModule(batch * (p.speed_warmup + p.speed_iterations + 8), batch)
        dm.prepare_data()
        dm.setup("fit")
        with contextlib.redirect_stdout(io.StringIO()):
            ours = benchmark.lightning_training(arch, dm, p.device, p.precision, True, False, p.speed_warmup,
                                                p.speed_iterations)  # fmt: skip
        ceiling = benchmark.graphed_plain_training(arch, dm, p.device, p.precision, True, p.speed_warmup,
                                                   p.speed_iterations)  # fmt: skip
        share = ours / ceiling
        figures = {"ours_images_per_s": ours, "graphed_loop_images_per_s": ceiling, "share": share}
        detail = f"{ours:,.0f} images/s, {share:.2f} of the graphed plain loop's {ceiling:,.0f} (target "
        detail += f"{CEILING_SHARE})"
        return Check(name, PASS if share >= CEILING_SHARE else FAIL, detail, figures)

    def run(self) -> list[Check]:
        """Every check, in order, with a progress line before each stage. A stage that raises fails its rows (on
        CUDA a fault can leave the device unusable, so later stages may fail with it)."""
        p = self.plan
        self.say(f"doctor: {p.arch}, batch {p.batch_size}, {p.steps} steps a fit, {p.precision} on {p.device.type}")
        runs: dict[str, Any] = {}

        def graphed() -> list[Check]:
            runs["graphed"], runs["reads"], mode = self._train(graphed=True)
            if mode["mode"] == "graphed":
                return [Check("graphed step", PASS, self.graph_backend().description, mode)]
            return [Check("graphed step", FAIL, f"the step ran eager: {mode['reason']}", mode)]

        def eager() -> list[Check]:
            weights, _, _ = self._train(graphed=False)
            return [self._compare("graphed = eager", runs["graphed"], weights, f"weights after {p.steps} steps"),
                    self.host_read_check("host reads", runs["reads"])]  # fmt: skip

        def ema() -> list[Check]:
            return [self.host_read_check("host reads with --ema", self._train(graphed=True, ema=0.999)[1])]

        stages: list[tuple[str, list[str], Callable[[], list[Check]]]] = [
            ("training graphed (counting host reads)", ["graphed step"], graphed),
            ("training eager", ["graphed = eager", "host reads"], eager),
            ("training graphed with --ema 0.999 (counting host reads)", ["host reads with --ema"], ema),
            ("saving mid-run and resuming in a new Trainer", ["checkpoint save", "resume"],
             lambda: self.resume_checks(runs["graphed"])),
        ]  # fmt: skip
        checks: list[Check] = []
        for what, names, stage in stages:
            self.say(f"doctor: {what} ...")
            try:
                checks.extend(stage())
            except Exception as err:
                checks.extend(Check(name, FAIL, f"raised {error_line(err)}") for name in names)
        checks.extend(self.speed_checks())
        return checks


@contextlib.contextmanager
def _quiet_fit() -> Iterator[None]:
    """A fit without its lines and notices (the step-mode line, the logger's notes): the doctor says what it does."""
    lightning_logger = logging.getLogger("lightning.pytorch")
    level = lightning_logger.level
    lightning_logger.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        lightning_logger.setLevel(level)


def _weights(module: ImageClassifier) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in module.model.state_dict().items()}


def _relative_distance(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    floats = [k for k, v in want.items() if v.is_floating_point()]
    difference = sum(float((got[k].double() - want[k].double()).pow(2).sum()) for k in floats)
    norm = sum(float(want[k].double().pow(2).sum()) for k in floats)
    return (difference / max(norm, 1e-30)) ** 0.5


def format_table(checks: list[Check]) -> str:
    """The checks as aligned text: check, status, what was found."""
    width = max(len(c.name) for c in checks)
    lines = [f"{'check':<{width}}  status   detail"]
    lines += [f"{c.name:<{width}}  {c.status:<7}  {c.detail}" for c in checks]
    return "\n".join(lines)


def report(plan: Plan, checks: list[Check], seconds: float) -> dict[str, Any]:
    """The doctor's JSON: the machine, the plan, every check, and whether all passed."""
    return {
        "passed": all(c.status != FAIL for c in checks),
        "device": environment.device_name(plan.device),
        "precision": plan.precision,
        "versions": environment.library_versions(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "seconds": round(seconds, 1),
        "checks": [asdict(c) for c in checks],
    }


@contextlib.contextmanager
def _work_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="cifar-doctor-") as folder:
        yield Path(folder)


def run_doctor(plan: Plan, out: Path, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every check of ``plan``, print the table, write the JSON to ``out``; returns the JSON's content."""
    start = time.perf_counter()
    with _work_dir() as work, quiet_lightning():
        checks = Doctor(plan, work, say).run()
    result = report(plan, checks, time.perf_counter() - start)
    say(format_table(checks))
    atomic_write_text(json.dumps(result, indent=2) + "\n", out)
    verdict = "all checks passed" if result["passed"] else "FAILED"
    say(f"doctor: {verdict} in {result['seconds']:.0f} s; the table is in {out}")
    return result
