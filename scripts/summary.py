"""Print a model's layer table, parameter count and MACs, or one table of every registered model.

python scripts/summary.py --arch resnet50 [--depth 2]
python scripts/summary.py --all [--markdown]
"""

from __future__ import annotations

import argparse
import sys

from cifar_resnet.models import create_model, list_models
from cifar_resnet.models.summary import (
    count_macs,
    count_params,
    format_layer_table,
    format_macs,
    format_model_rows,
    layer_table,
    model_rows,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--arch", help="one registered model name")
    what.add_argument("--all", action="store_true", help="one row (params, MACs) per registered model")
    parser.add_argument("--num-classes", type=int, default=10, help="classifier width (default 10)")
    parser.add_argument(
        "--depth", type=int, default=1, help="layer table depth: 1 = stages, larger = finer (default 1)"
    )
    parser.add_argument("--markdown", action="store_true", help="with --all: print a Markdown table")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.num_classes < 1 or args.depth < 1:
        print("error: --num-classes and --depth must be >= 1", file=sys.stderr)
        return 2
    if args.all:
        print(format_model_rows(model_rows(num_classes=args.num_classes), markdown=args.markdown))
        return 0
    if args.arch not in list_models():
        print(f"error: unknown arch {args.arch!r}; known: {', '.join(list_models())}", file=sys.stderr)
        return 2
    model = create_model(args.arch, num_classes=args.num_classes)
    print(f"{args.arch} (input 1x3x32x32, {args.num_classes} classes)\n")
    print(format_layer_table(layer_table(model, depth=args.depth)))
    print(f"\nparams: {count_params(model):,}")
    print(f"MACs:   {format_macs(count_macs(model))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
