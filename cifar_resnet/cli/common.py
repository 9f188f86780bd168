"""What every script shares: one-line argument errors and user mistakes as ``NAME.py: error: ...`` (exit 2)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import NoReturn

from cifar_resnet.errors import UserError


def run_reporting_user_errors(prog: str, work: Callable[[], int]) -> int:
    """Run ``work``; a :class:`UserError` becomes one line on stderr and exit status 2, no traceback."""
    try:
        return work()
    except UserError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse that reports a bad argument on one line (no usage dump) and exits with status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")
