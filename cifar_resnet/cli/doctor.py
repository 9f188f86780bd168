"""``python -m cifar_resnet doctor``: check the training path on this machine and write a pass/fail table."""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from cifar_resnet.cli.common import OneLineErrorParser, run_reporting_user_errors
from cifar_resnet.errors import UserError
from cifar_resnet.tools.doctor import Plan, run_doctor
from cifar_resnet.training.trainer import resolve_precision


def build_parser() -> argparse.ArgumentParser:
    p = OneLineErrorParser(
        prog="doctor",
        description="Check the training step on this machine (synthetic data, no data set needed): graphed against "
        "eager, host reads with and without EMA, resume, checkpoint save time and, on CUDA, our step against the "
        "CUDA-graphed plain loop. Exits 1 when a check fails.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to check")
    p.add_argument("--precision", default="auto", help="Lightning precision; auto as in fit.py")
    p.add_argument("--out", default="doctor.json", help="the table as JSON (replaced if it exists)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m cifar_resnet doctor``: 0 when every check passed or was skipped, 1 on a failure."""
    args = build_parser().parse_args(argv)

    def work() -> int:
        if args.device == "cuda" and not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA GPU is visible; use --device cpu")
        out = Path(args.out)
        if out.is_dir() or not out.parent.is_dir():
            raise UserError(f"--out {out}: give a file in an existing folder")
        on_gpu = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
        device = torch.device("cuda" if on_gpu else "cpu")
        plan = Plan.for_device(device, resolve_precision(args.precision, device.type))
        with warnings.catch_warnings():
            # The doctor's fits skip validation on purpose: there is no val/acc to select a checkpoint on.
            warnings.filterwarnings("ignore", message=r"`ModelCheckpoint\(monitor='val/acc'\)` could not find")
            result = run_doctor(plan, out, say=lambda line: print(line, flush=True))
        return 0 if result["passed"] else 1

    return run_reporting_user_errors("doctor", work)


if __name__ == "__main__":
    sys.exit(main())
