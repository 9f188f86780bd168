"""``scripts/plot.py``: a run's curves as PNG files."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from cifar_resnet.cli.common import DefaultsHelpFormatter, OneLineErrorParser, run_reporting_user_errors
from cifar_resnet.tools.curves import plot_run


def build_parser() -> argparse.ArgumentParser:
    p = OneLineErrorParser(
        prog="plot.py",
        description="PNG curves of loss, accuracy and learning rate of a run folder.",
        formatter_class=DefaultsHelpFormatter,
    )
    p.add_argument("run_dir", help="a run folder, e.g. lightning_logs/resnet20/version_0")
    p.add_argument("--out", default=None, help="output folder (default RUN_DIR/plots)")
    p.add_argument("--overwrite", action="store_true", help="replace plots written before")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``scripts/plot.py``."""
    args = build_parser().parse_args(argv)

    def work() -> int:
        written, skipped = plot_run(args.run_dir, args.out, args.overwrite)
        for path in written:
            print(path)
        for note in skipped:
            print(f"plot.py: {note}", file=sys.stderr)
        return 0

    return run_reporting_user_errors("plot.py", work)
