"""``scripts/predict.py``: the top-k classes of image files, as a table or JSON."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from cifar_resnet.cli.common import DefaultsHelpFormatter, OneLineErrorParser, run_reporting_user_errors
from cifar_resnet.data.sources import IMAGE_SIZE
from cifar_resnet.errors import UserError
from cifar_resnet.tables import format_table
from cifar_resnet.tools.predict import Prediction, predict_files


def format_predictions(predictions: Sequence[Prediction]) -> str:
    k = max(len(p.classes) for p in predictions)
    header = ["image"] + [f"top-{i + 1}" for i in range(k)]
    rows = [[p.path] + [f"{c} {v:.3f}" for c, v in zip(p.classes, p.probs, strict=True)] for p in predictions]
    return format_table(header, rows)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineErrorParser(
        prog="predict.py",
        description="Top-k classes with probabilities for image files (any size; resized to 32x32).",
        formatter_class=DefaultsHelpFormatter,
    )
    p.add_argument("--ckpt_path", required=True, help="a checkpoint written by fit.py")
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files or folders of images")
    p.add_argument("--topk", type=int, default=3, help="classes shown per image")
    p.add_argument("--batch_size", type=int, default=256, help="images per forward pass")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``scripts/predict.py``."""
    args = build_parser().parse_args(argv)

    def work() -> int:
        if args.topk < 1 or args.batch_size < 1:
            raise UserError("--topk and --batch_size must be at least 1")
        predictions, downscaled = predict_files(args.ckpt_path, args.inputs, args.topk, args.batch_size)
        if downscaled:
            print(
                f"predict.py: warning: {len(downscaled)} of {len(predictions)} images are larger than "
                f"{IMAGE_SIZE}x{IMAGE_SIZE} and were downscaled, losing detail (first: {downscaled[0]})",
                file=sys.stderr,
            )
        if args.json:
            print(json.dumps([p.__dict__ for p in predictions], indent=2))
        else:
            print(format_predictions(predictions))
        return 0

    return run_reporting_user_errors("predict.py", work)
