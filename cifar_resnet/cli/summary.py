"""``scripts/summary.py``: a model's layer table, parameter count and MACs, or one row per registered model.

python scripts/summary.py --arch resnet50 [--depth 2]
python scripts/summary.py --all [--markdown]
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Sequence

from cifar_resnet.cli.common import OneLineErrorParser, run_reporting_user_errors
from cifar_resnet.errors import UserError
from cifar_resnet.models import create_model, list_models
from cifar_resnet.models.summary import (
    LayerRow,
    ModelRow,
    count_macs,
    count_params,
    format_macs,
    layer_table,
    model_rows,
)
from cifar_resnet.tables import format_table


def format_layer_table(rows: Iterable[LayerRow]) -> str:
    """Name, type, output shape and parameters of each layer."""
    cells = [
        (r.name, r.type, "x".join(map(str, r.output_shape)) if r.output_shape else "-", f"{r.params:,}") for r in rows
    ]
    return format_table(("layer", "type", "output shape", "params"), cells)


def format_model_rows(rows: Iterable[ModelRow], markdown: bool = False) -> str:
    """Name, parameters and MACs of each model, as text or as a Markdown table."""
    cells = [(f"`{r.name}`" if markdown else r.name, f"{r.params:,}", format_macs(r.macs)) for r in rows]
    return format_table(("model", "params", "MACs (1x3x32x32)"), cells, markdown=markdown)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="summary.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--arch", help="one registered model name")
    what.add_argument("--all", action="store_true", help="one row (params, MACs) per registered model")
    parser.add_argument("--num_classes", "--num-classes", type=int, default=10, help="classifier width (default 10)")
    parser.add_argument(
        "--depth", type=int, default=1, help="layer table depth: 1 = stages, larger = finer (default 1)"
    )
    parser.add_argument("--markdown", action="store_true", help="with --all: print a Markdown table")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``scripts/summary.py``."""
    args = build_parser().parse_args(argv)

    def work() -> int:
        if args.num_classes < 1 or args.depth < 1:
            raise UserError("--num_classes and --depth must be at least 1")
        if args.all:
            print(format_model_rows(model_rows(num_classes=args.num_classes), markdown=args.markdown))
            return 0
        if args.arch not in list_models():
            raise UserError(f"unknown arch {args.arch!r}; known: {', '.join(list_models())}")
        model = create_model(args.arch, num_classes=args.num_classes)
        print(f"{args.arch} (input 1x3x32x32, {args.num_classes} classes)\n")
        print(format_layer_table(layer_table(model, depth=args.depth)))
        print(f"\nparams: {count_params(model):,}")
        print(f"MACs:   {format_macs(count_macs(model))}")
        return 0

    return run_reporting_user_errors("summary.py", work)
