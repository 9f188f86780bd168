"""``scripts/export.py``: a checkpoint's model as a file usable without Lightning."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from cifar_resnet.cli.common import DefaultsHelpFormatter, OneLineErrorParser, run_reporting_user_errors
from cifar_resnet.tools.export import FORMATS, export_checkpoint


def build_parser() -> argparse.ArgumentParser:
    p = OneLineErrorParser(
        prog="export.py",
        description="Export a checkpoint's model as a plain file usable without Lightning.",
        formatter_class=DefaultsHelpFormatter,
    )
    p.add_argument("--ckpt_path", required=True, help="a checkpoint written by fit.py")
    p.add_argument("--format", required=True, choices=list(FORMATS), help="file format")
    p.add_argument("--out", default=None, help="output file (default: beside the checkpoint)")
    p.add_argument("--overwrite", action="store_true", help="replace --out (and its .json) if it exists")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``scripts/export.py``."""
    args = build_parser().parse_args(argv)

    def work() -> int:
        path, check = export_checkpoint(args.ckpt_path, args.format, args.out, args.overwrite)
        print(f"wrote {path} ({args.format}; input RGB in [0, 1]) and {path}.json (classes, mean/std)")
        print(check)
        return 0

    return run_reporting_user_errors("export.py", work)
