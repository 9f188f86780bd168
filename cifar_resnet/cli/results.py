"""``scripts/results.py``: the results table of run records (``result.json``), mean ± std over seeds."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from cifar_resnet.cli.common import DefaultsHelpFormatter, OneLineErrorParser, run_reporting_user_errors
from cifar_resnet.errors import UserError
from cifar_resnet.tools.results import deduplicate, read_records, repeat_warning, results_table, summarize


def build_parser() -> argparse.ArgumentParser:
    p = OneLineErrorParser(
        prog="results.py",
        description="Collect the result.json of finished runs into a table: one row per recipe, mean ± std "
        "(sample std, n - 1) over the seeds.",
        formatter_class=DefaultsHelpFormatter,
    )
    p.add_argument("paths", nargs="*", default=["lightning_logs"], help="run folders, log folders or record files")
    p.add_argument("--markdown", action="store_true", help="a Markdown table (for the README)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``scripts/results.py``."""
    args = build_parser().parse_args(argv)

    def work() -> int:
        records, repeats = deduplicate(read_records(args.paths))
        for seed, folders in repeats:
            print(f"results.py: warning: {repeat_warning(seed, folders)}", file=sys.stderr)
        rows = summarize(records)
        if not rows:
            raise UserError(f"no finished run's result.json under {' '.join(args.paths)}")
        print(results_table(rows, markdown=args.markdown))
        return 0

    return run_reporting_user_errors("results.py", work)
