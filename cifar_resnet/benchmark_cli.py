"""``scripts/benchmark.py``: data-pipeline and training throughput, ours against the usual baselines."""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch

from cifar_resnet import benchmark
from cifar_resnet.benchmark import Figure
from cifar_resnet.cli import OneLineErrorParser
from cifar_resnet.data import CIFARDataModule
from cifar_resnet.errors import UserError
from cifar_resnet.models import list_models
from cifar_resnet.trainer import resolve_precision


def build_parser() -> argparse.ArgumentParser:
    p = OneLineErrorParser(
        prog="benchmark.py",
        description="Measure data-pipeline and training throughput against plain baselines.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
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
    p.add_argument("--batch_size", type=int, default=None, help="training batch (default 128 CPU, 512 CUDA)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers, the same for ours and the baseline")
    p.add_argument("--precision", default="auto", help="Lightning precision; auto as in fit.py")
    p.add_argument("--warmup", type=int, default=None, help="untimed iterations (default 3 CPU, 20 CUDA)")
    p.add_argument("--iterations", type=int, default=None, help="timed iterations (default 10 CPU, 100 CUDA)")
    p.add_argument("--compile", action="store_true", help="also time the first arch with torch.compile")
    p.add_argument("--rounds", type=int, default=3, help="alternating Lightning / plain-loop timings per arch")
    p.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="STEPS",
        help="also profile STEPS training steps of the first arch and print the top operators (0: off)",
    )
    p.add_argument("--profile_trace", default=None, help="write the profile's Chrome trace to this file")
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
        if value is not None and value < least:
            raise UserError(f"--{name} must be at least {least}, got {value}")


def run(args: argparse.Namespace) -> list[Figure]:
    _check_counts(args)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is visible; use --device cpu")
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")  # fmt: skip
    on_gpu = device.type == "cuda"
    archs = args.archs or (["resnet18", "resnet50", "resnet20"] if on_gpu else ["resnet20"])
    batch = args.batch_size or (512 if on_gpu else 128)
    warmup = args.warmup if args.warmup is not None else (20 if on_gpu else 3)
    iterations = args.iterations if args.iterations is not None else (100 if on_gpu else 10)
    precision = resolve_precision(args.precision, "cuda" if on_gpu else "cpu")
    channels_last = True  # fit.py's default
    if on_gpu:
        torch.backends.cudnn.benchmark = True
        torch.set_float32_matmul_precision("high")
    data_dir = Path(args.data_dir)

    def datamodule(workers: int) -> CIFARDataModule:
        dm = CIFARDataModule(data_dir=str(data_dir), batch_size=batch, val_size=args.val_size,
                             num_workers=workers, cache_dir=args.cache_dir)  # fmt: skip
        dm.prepare_data()
        dm.setup("fit")
        return dm

    dm = datamodule(args.workers)
    print(f"# {_environment(device)}; batch {batch}; precision {precision}; workers {args.workers}", flush=True)
    figures: list[Figure] = []

    def record(name: str, value: float, unit: str = "images/s", **details: object) -> None:
        figure = Figure(name, value, unit, device.type, {"batch_size": batch, **details})
        figures.append(figure)
        print(figure.json_line(), flush=True)

    ours = benchmark.our_pipeline(dm, device, warmup, max(iterations, 100))
    record("data/ours", ours, workers=args.workers)
    pil = benchmark.pil_pipeline(data_dir, batch, args.workers, device, min(warmup, 2), min(iterations, 10))
    record("data/pil_baseline", pil, workers=args.workers)
    record("data/ratio_ours_over_pil", ours / pil, "x")
    if args.workers > 0:
        # Our batches come from memory, so worker processes only add a hop; show what no workers give.
        in_process = benchmark.our_pipeline(datamodule(0), device, warmup, max(iterations, 100))
        record("data/ours_no_workers", in_process, workers=0)
        record("data/ratio_ours_no_workers_over_pil", in_process / pil, "x", pil_workers=args.workers)

    for index, arch in enumerate(archs):
        # Lightning and the plain loop take turns, so a burst of load from elsewhere hits both alike.
        lits, plains = [], []
        for _ in range(args.rounds):
            lits.append(benchmark.lightning_training(arch, dm, device, precision, channels_last, False, warmup,
                                                     iterations))  # fmt: skip
            plains.append(benchmark.plain_training(arch, dm, device, precision, channels_last, warmup, iterations))
        lit, plain = statistics.median(lits), statistics.median(plains)
        record(f"train/{arch}/lightning", lit, precision=precision, channels_last=channels_last, rounds=lits)
        record(f"train/{arch}/plain_loop", plain, precision=precision, channels_last=channels_last, rounds=plains)
        ratios = [p / q for p, q in zip(plains, lits, strict=True)]
        record(f"train/{arch}/step_time_ratio_lightning_over_plain", statistics.median(ratios), "x", rounds=ratios)
        record(f"train/{arch}/data_share_of_step", lit / ours, "fraction")
        # What a 200-epoch run of this training split costs at this rate (validation not included).
        minutes = 200 * len(dm.train_split) / lit / 60
        record(f"train/{arch}/projected_200_epochs", minutes, "minutes", train_images=len(dm.train_split))
        if index == 0:
            other = benchmark.lightning_training(arch, dm, device, precision, not channels_last, False, warmup,
                                                 iterations)  # fmt: skip
            record(f"train/{arch}/lightning_channels_last_{not channels_last}", other, precision=precision)
            if args.compile:
                compiled = benchmark.lightning_training(arch, dm, device, precision, channels_last, True,
                                                        warmup, iterations)  # fmt: skip
                record(f"train/{arch}/lightning_compiled", compiled, precision=precision)
    if args.profile:
        trace = Path(args.profile_trace) if args.profile_trace else None
        ops, table = benchmark.profile_training(archs[0], dm, device, precision, channels_last, warmup, args.profile,
                                                trace=trace)  # fmt: skip
        print(f"# where {args.profile} training steps of {archs[0]} spend their time", flush=True)
        print(table, flush=True)
        clock = "gpu" if on_gpu else "cpu"
        for rank, op in enumerate(ops, start=1):
            record(f"profile/{archs[0]}/top{rank}", op.share, f"fraction of {clock} self time", op=op.name,
                   self_ms=round(op.self_ms, 3), calls=op.calls, steps=args.profile)  # fmt: skip
    return figures


def format_table(figures: list[Figure]) -> str:
    rows = ["| figure | value | unit |", "| --- | ---: | --- |"]
    rows += [f"| {f.name} | {f.value:,.2f} | {f.unit} |" for f in figures]
    return "\n".join(rows)


def benchmark_main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        figures = run(args)
    except UserError as err:
        print(f"benchmark.py: error: {err}", file=sys.stderr)
        return 2
    print()
    print(format_table(figures))
    return 0
