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


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Help lines end with ``(default: X)`` where there is a default to show: not for options without one (None,
    or an off switch), nor where the help text already says its default."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if "default" in text or default is None or default is False or default == argparse.SUPPRESS:
            return text
        if action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            return f"{text} (default: %(default)s)"
        return text


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse that reports a bad argument on one line (no usage dump) and exits with status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")
