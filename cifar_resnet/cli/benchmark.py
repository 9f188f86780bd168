"""``scripts/benchmark.py``: data-pipeline and training throughput, ours against the usual baselines."""

from __future__ import annotations

import argparse
import platform
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch

from cifar_resnet import tables
from cifar_resnet.cli.common import DefaultsHelpFormatter, OneLineErrorParser, run_reporting_user_errors
from cifar_resnet.cli.quiet import quiet_lightning
from cifar_resnet.config import DataConfig
from cifar_resnet.data import CIFARDataModule
from cifar_resnet.data.sources import check_data_dir
from cifar_resnet.errors import UserError
from cifar_resnet.models import list_models
from cifar_resnet.tools import benchmark
from cifar_resnet.tools.benchmark import Figure
from cifar_resnet.training.trainer import resolve_precision


def build_parser() -> argparse.ArgumentParser:
    p = OneLineErrorParser(
        prog="benchmark.py",
        description="Measure data-pipeline and training throughput against plain baselines.",
        formatter_class=DefaultsHelpFormatter,
    )
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to measure")
    p.add_argument("--data_dir", default="./data", help="image folder (DIR/train/<class>/*) or CIFAR-10 files")
    p.add_argument("--cache_dir", default=None, help="decoded-image cache (default ~/.cache/cifar_resnet)")
    p.add_argument(
        "--archs",
        nargs="+",
        default=None,
        choices=list_models(),
        metavar="ARCH",
        help="architectures to time (default: resnet20 on the CPU; resnet18 resnet50 resnet20 on CUDA)",
    )
    p.add_argument("--val_size", type=int, default=5000, help="held out as in fit.py (not timed)")
    p.add_argument(
        "--batch_size",
        type=int,
        nargs="+",
        default=None,
        help="training batch sizes to time (default 128 on the CPU; 128 and 512 on CUDA)",
    )
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers, the same for ours and the baseline")
    p.add_argument("--precision", default="auto", help="Lightning precision; auto as in fit.py")
    p.add_argument("--warmup", type=int, default=None, help="untimed iterations (default 3 CPU, 20 CUDA)")
    p.add_argument("--iterations", type=int, default=None, help="timed iterations (default 10 CPU, 100 CUDA)")
    p.add_argument("--compile", action="store_true", help="also time the first arch with torch.compile")
    p.add_argument("--no_cuda_graphs", "--no-cuda_graphs", dest="cuda_graphs", action="store_false",
                   help="time our step eager, as fit.py --no_cuda_graphs (the CPU step is eager anyway)")  # fmt: skip
    p.add_argument("--rounds", type=int, default=3, help="alternating Lightning / plain-loop timings per arch")
    p.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="STEPS",
        help="also profile STEPS training steps of the first arch and print the top operators (0: off)",
    )
    p.add_argument("--profile_trace", default=None, help="write the profile's Chrome trace to this file")
    p.add_argument(
        "--recipes",
        action="store_true",
        help="time the augmentation recipes (each policy, MixUp, CutMix) and their share of a training step of the "
        "first arch, instead of the pipeline and training figures",
    )
    p.add_argument(
        "--checkpoint",
        action="store_true",
        help="time a checkpoint save of each arch as the training thread sees it (and the write beside it), instead "
        "of the pipeline and training figures; needs no data",
    )
    return p


def _environment(device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return (
        f"{name}; {torch.get_num_threads()} threads; torch {torch.__version__}; lightning {L.__version__}; "
        f"python {platform.python_version()}; {time.strftime('%Y-%m-%d')}"
    )


def _check_counts(args: argparse.Namespace) -> None:
    minimum = {"rounds": 1, "iterations": 1, "batch_size": 1, "warmup": 0, "workers": 0, "val_size": 0, "profile": 0}
    for name, least in minimum.items():
        value = getattr(args, name)
        for one in value if isinstance(value, list) else [value]:
            if one is not None and one < least:
                raise UserError(f"--{name} must be at least {least}, got {one}")


@dataclass
class _Plan:
    """What one benchmark run measures, with the device's defaults filled in."""

    device: torch.device
    archs: list[str]
    batches: list[int]
    warmup: int
    iterations: int
    precision: str
    channels_last: bool = True  # fit.py's default
    cuda_graphs: bool = True  # fit.py's default: our step replayed as one CUDA graph on a GPU

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"

    @property
    def batch(self) -> int:
        """The batch of the data-pipeline and profile figures: the first one."""
        return self.batches[0]


def _plan(args: argparse.Namespace) -> _Plan:
    _check_counts(args)
    # CIFAR-10 is downloaded only into the default folder: a mistyped --data_dir is an error, not a download.
    if not getattr(args, "checkpoint", False):
        check_data_dir(args.data_dir, may_download=args.data_dir == DataConfig().data_dir)
    if args.profile_trace and Path(args.profile_trace).exists():
        raise UserError(f"--profile_trace {args.profile_trace} exists; choose another file name")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is visible; use --device cpu")
    on_gpu = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    return _Plan(
        device=torch.device("cuda" if on_gpu else "cpu"),
        archs=args.archs or (["resnet18", "resnet50", "resnet20"] if on_gpu else ["resnet20"]),
        batches=args.batch_size or ([128, 512] if on_gpu else [128]),
        warmup=args.warmup if args.warmup is not None else (20 if on_gpu else 3),
        iterations=args.iterations if args.iterations is not None else (100 if on_gpu else 10),
        precision=resolve_precision(args.precision, "cuda" if on_gpu else "cpu"),
        cuda_graphs=args.cuda_graphs,
    )


class _Recorder:
    """Collects figures and prints each as a JSON line the moment it is measured."""

    def __init__(self, plan: _Plan) -> None:
        self.plan = plan
        self.figures: list[Figure] = []

    def __call__(self, name: str, value: float, unit: str = "images/s", **details: object) -> None:
        figure = Figure(name, value, unit, self.plan.device.type, {"batch_size": self.plan.batch, **details})
        self.figures.append(figure)
        print(figure.json_line(), flush=True)


def _data_figures(
    plan: _Plan,
    args: argparse.Namespace,
    make_dm: Callable[..., CIFARDataModule],
    dm: CIFARDataModule,
    record: _Recorder,
) -> float:
    """Our pipeline against the PIL DataLoader with the same workers; returns our images per second."""
    timed = max(plan.iterations, 100)
    ours = benchmark.our_pipeline(dm, plan.device, plan.warmup, timed)
    record("data/ours", ours, workers=args.workers)
    pil = benchmark.pil_pipeline(Path(args.data_dir), plan.batch, args.workers, plan.device, min(plan.warmup, 2),
                                 min(plan.iterations, 10))  # fmt: skip
    record("data/pil_baseline", pil, workers=args.workers)
    record("data/ratio_ours_over_pil", ours / pil, "x")
    if args.workers > 0:
        # Our batches come from memory, so worker processes only add a hop; show what no workers give.
        in_process = benchmark.our_pipeline(make_dm(0), plan.device, plan.warmup, timed)
        record("data/ours_no_workers", in_process, workers=0)
        record("data/ratio_ours_no_workers_over_pil", in_process / pil, "x", pil_workers=args.workers)
    return ours


def _training_figures(
    plan: _Plan, args: argparse.Namespace, make_dm: Callable[..., CIFARDataModule], ours: float,
    record: _Recorder,
) -> None:  # fmt: skip
    """Per arch and batch size: our Lightning step against the eager plain loop (alternating rounds) and, on
    CUDA, against the CUDA-graphed plain loop (the ceiling), host syncs per step and the cost between epochs.
    channels_last and compile are switched for the first arch at the first batch size."""
    p = plan
    for batch in p.batches:
        dm = make_dm(args.workers, batch)
        for index, arch in enumerate(p.archs):
            _arch_figures(p, args, dm, arch, batch, ours, record, first=index == 0 and batch == p.batches[0])


def _arch_figures(
    p: _Plan, args: argparse.Namespace, dm: CIFARDataModule, arch: str, batch: int, ours: float, record: _Recorder,
    first: bool,
) -> None:  # fmt: skip
    name = f"train/{arch}/bs{batch}"
    common = {"precision": p.precision, "channels_last": p.channels_last, "batch_size": batch,
              "cuda_graphs": p.cuda_graphs}  # fmt: skip
    # Lightning and the plain loop take turns, so a burst of load from elsewhere hits both alike.
    lits, plains = [], []
    for _ in range(args.rounds):
        lits.append(benchmark.lightning_training(arch, dm, p.device, p.precision, p.channels_last, False,
                                                 p.warmup, p.iterations, p.cuda_graphs))  # fmt: skip
        plains.append(benchmark.plain_training(arch, dm, p.device, p.precision, p.channels_last, p.warmup,
                                               p.iterations))  # fmt: skip
    lit, plain = statistics.median(lits), statistics.median(plains)
    record(f"{name}/lightning", lit, rounds=lits, **common)
    record(f"{name}/plain_loop", plain, rounds=plains, **common)
    ratios = [a / b for a, b in zip(plains, lits, strict=True)]
    record(f"{name}/step_time_ratio_lightning_over_plain", statistics.median(ratios), "x", rounds=ratios,
           batch_size=batch)  # fmt: skip
    record(f"{name}/data_share_of_step", lit / ours, "fraction", batch_size=batch)
    if p.on_gpu:
        ceiling = benchmark.graphed_plain_training(arch, dm, p.device, p.precision, p.channels_last, p.warmup,
                                                   p.iterations)  # fmt: skip
        record(f"{name}/graphed_plain_loop", ceiling, **common)
        record(f"{name}/lightning_over_graphed_loop", lit / ceiling, "fraction", batch_size=batch)
        syncs = benchmark.host_syncs_per_step(arch, dm, p.device, p.precision, p.channels_last, p.warmup,
                                              p.iterations, p.cuda_graphs)  # fmt: skip
        record(f"{name}/host_syncs_per_step", syncs, "syncs", batch_size=batch)
    # What a 200-epoch run of this training split costs at this rate, and what passes between epochs.
    train_images = len(dm.train_split) if dm.train_split is not None else 0
    epoch_train = train_images / lit
    gap = benchmark.epoch_overhead(arch, dm, p.device, p.precision, p.channels_last, p.warmup + p.iterations,
                                   p.cuda_graphs)  # fmt: skip
    record(f"{name}/between_epochs", gap, "seconds", batch_size=batch)
    record(f"{name}/between_epochs_share", gap / (epoch_train + gap), "fraction of an epoch", batch_size=batch,
           epoch_training_seconds=epoch_train)  # fmt: skip
    record(f"{name}/projected_200_epochs", 200 * (epoch_train + gap) / 60, "minutes", train_images=train_images,
           batch_size=batch)  # fmt: skip
    if not first:
        return
    other = benchmark.lightning_training(arch, dm, p.device, p.precision, not p.channels_last, False, p.warmup,
                                         p.iterations, p.cuda_graphs)  # fmt: skip
    record(f"{name}/lightning_channels_last_{not p.channels_last}", other, **common)
    if args.compile:
        compiled = benchmark.lightning_training(arch, dm, p.device, p.precision, p.channels_last, True, p.warmup,
                                                p.iterations, p.cuda_graphs)  # fmt: skip
        record(f"{name}/lightning_compiled", compiled, **common)


def _profile_figures(plan: _Plan, args: argparse.Namespace, dm: CIFARDataModule, record: _Recorder) -> None:
    """The top operators of ``--profile`` training steps of the first arch, as a table and figures."""
    arch = plan.archs[0]
    trace = Path(args.profile_trace) if args.profile_trace else None
    ops, table = benchmark.profile_training(arch, dm, plan.device, plan.precision, plan.channels_last, plan.warmup,
                                            args.profile, trace=trace, cuda_graphs=plan.cuda_graphs)  # fmt: skip
    print(f"# where {args.profile} training steps of {arch} spend their time", flush=True)
    print(table, flush=True)
    clock = "gpu" if plan.on_gpu else "cpu"
    for rank, op in enumerate(ops, start=1):
        record(f"profile/{arch}/top{rank}", op.share, f"fraction of {clock} self time", op=op.name,
               self_ms=round(op.self_ms, 3), calls=op.calls, steps=args.profile,
               cuda_graphs=plan.cuda_graphs)  # fmt: skip


def _recipe_figures(plan: _Plan, dm: CIFARDataModule, rounds: int, record: _Recorder) -> None:
    """Images/s of each augmentation recipe, and the share of a training step it adds over crop and flip.

    The recipes take turns for ``rounds`` rounds and each figure is the median of its rounds, so a burst of
    load from elsewhere hits them alike. The step is the plain loop's (the first arch, with crop and flip); a
    recipe adds ``1/recipe - 1/baseline`` seconds per image to it, and its share is that over the step's
    seconds per image plus the addition, in percent.
    """
    timed = max(plan.iterations, 50)
    measured: dict[str, list[float]] = {name: [] for name in benchmark.RECIPES}
    for _ in range(rounds):
        for name, options in benchmark.RECIPES.items():
            measured[name].append(benchmark.recipe_augmentation(dm, options, plan.device, plan.warmup, timed))
    rates = {name: statistics.median(values) for name, values in measured.items()}
    arch = plan.archs[0]
    step = benchmark.plain_training(arch, dm, plan.device, plan.precision, plan.channels_last, plan.warmup,
                                    plan.iterations)  # fmt: skip
    record(f"recipes/{arch}_training_step", step, arch=arch)
    base = rates["crop+flip"]
    for name, rate in rates.items():
        record(f"recipes/{name}", rate, options=benchmark.RECIPES[name], rounds=measured[name])
        if name != "crop+flip":
            added = max(0.0, 1 / rate - 1 / base)
            record(f"recipes/{name}/share_of_step", 100 * added / (1 / step + added), "% of a step", arch=arch)


def _checkpoint_figures(plan: _Plan, saves: int) -> list[Figure]:
    """The training thread's cost of a checkpoint save per arch (median of ``saves``), and the background write."""
    print(f"# {_environment(plan.device)}; checkpoint saves, median of {saves}", flush=True)
    record = _Recorder(plan)
    for arch in plan.archs:
        cost = benchmark.checkpoint_save_cost(arch, plan.device, saves)
        record(f"checkpoint/{arch}/training_thread", cost.training_thread_ms, "ms per save", megabytes=cost.megabytes)
        record(f"checkpoint/{arch}/background_write", cost.background_write_ms, "ms per save", megabytes=cost.megabytes)
    return record.figures


def run(args: argparse.Namespace) -> list[Figure]:
    plan = _plan(args)
    if plan.on_gpu:
        torch.backends.cudnn.benchmark = True
        torch.set_float32_matmul_precision("high")

    def make_dm(workers: int, batch: int | None = None) -> CIFARDataModule:
        dm = CIFARDataModule(data_dir=args.data_dir, batch_size=batch or plan.batch, val_size=args.val_size,
                             num_workers=workers, cache_dir=args.cache_dir)  # fmt: skip
        dm.prepare_data()
        dm.setup("fit")
        return dm

    if args.checkpoint:
        return _checkpoint_figures(plan, args.iterations or 5)
    dm = make_dm(args.workers)
    batches = " ".join(map(str, plan.batches))
    print(f"# {_environment(plan.device)}; batch {batches}; precision {plan.precision}; workers {args.workers}",
          flush=True)  # fmt: skip
    record = _Recorder(plan)
    if args.recipes:
        _recipe_figures(plan, dm, args.rounds, record)
        return record.figures
    ours = _data_figures(plan, args, make_dm, dm, record)
    _training_figures(plan, args, make_dm, ours, record)
    if args.profile:
        _profile_figures(plan, args, dm, record)
    return record.figures


def format_table(figures: list[Figure]) -> str:
    """The figures as a Markdown table, as docs/BENCHMARKS.md shows them."""
    return tables.format_table(("figure", "value", "unit"), [(f.name, f"{f.value:,.2f}", f.unit) for f in figures],
                               markdown=True)  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``scripts/benchmark.py``."""
    args = build_parser().parse_args(argv)

    def work() -> int:
        with quiet_lightning(), warnings.catch_warnings():
            # The timed fits skip validation on purpose, so there is no val/acc to select a best checkpoint on.
            warnings.filterwarnings("ignore", message=r"`ModelCheckpoint\(monitor='val/acc'\)` could not find")
            figures = run(args)
        print()
        print(format_table(figures))
        return 0

    return run_reporting_user_errors("benchmark.py", work)
