"""``scripts/test.py``: evaluate a checkpoint and write its report folder."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from cifar_resnet.cli.common import DefaultsHelpFormatter, OneLineErrorParser, run_reporting_user_errors
from cifar_resnet.tools.evaluate import evaluate_checkpoint, format_report


def build_parser() -> argparse.ArgumentParser:
    p = OneLineErrorParser(
        prog="test.py",
        description="Evaluate a checkpoint: accuracy, per-class accuracy, confusion matrix, calibration, mistakes.",
        formatter_class=DefaultsHelpFormatter,
    )
    p.add_argument("--ckpt_path", required=True, help="a checkpoint written by fit.py")
    p.add_argument("--data_dir", default=None, help="evaluate on this data instead of the checkpoint's")
    p.add_argument("--split", default="test", choices=["test", "val"], help="val: the held-out validation split")
    p.add_argument("--tta", action="store_true", help="average the softmax over the image and its mirror")
    p.add_argument("--out", default=None, help="report folder (default: <run>/eval-<ckpt stem>)")
    p.add_argument("--batch_size", type=int, default=512, help="evaluation batch size")
    p.add_argument("--cache_dir", default=None, help="decoded image-folder cache (default ~/.cache/cifar_resnet)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier report in the same folder")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``scripts/test.py``."""
    args = build_parser().parse_args(argv)

    def work() -> int:
        result, out = evaluate_checkpoint(
            args.ckpt_path,
            args.data_dir,
            args.split,
            args.tta,
            args.out,
            args.batch_size,
            args.cache_dir,
            args.overwrite,
        )
        print(format_report(result, Path(args.ckpt_path)))
        print(f"\nreport written to {out}")
        return 0

    return run_reporting_user_errors("test.py", work)
