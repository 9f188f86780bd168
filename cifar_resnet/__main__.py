"""``python -m cifar_resnet COMMAND [OPTIONS]``: the scripts of ``scripts/`` as one command."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

COMMANDS = {
    "fit": "train a model (python -m cifar_resnet fit --help)",
    "test": "evaluate a checkpoint and write a report folder",
    "predict": "classify image files with a checkpoint",
    "export": "write a checkpoint's model as TorchScript, ONNX, safetensors or a state dict",
    "plot": "draw a run's curves as PNG files",
    "summary": "print a model's layers, parameters and MACs",
    "results": "collect finished runs' result.json into a table (mean ± std over seeds)",
    "benchmark": "measure data and training throughput",
    "doctor": "check the training step on this machine (graphed = eager, host reads, resume, speed)",
}


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        width = max(map(len, COMMANDS))
        lines = [f"  {name:<{width}}  {what}" for name, what in COMMANDS.items()]
        print("usage: python -m cifar_resnet COMMAND [OPTIONS]\n\ncommands:\n" + "\n".join(lines))
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        print(f"cifar_resnet: error: unknown command {command!r}; one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    try:
        return importlib.import_module(f"cifar_resnet.cli.{command}").main(rest)
    except KeyboardInterrupt:  # Ctrl-C while Lightning loads, or before the command handles signals itself
        print(f"cifar_resnet {command}: stopped by SIGINT (Ctrl-C)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
