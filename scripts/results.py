"""Results table of finished runs: ``python scripts/results.py lightning_logs [--markdown]``."""

import sys

from cifar_resnet.cli.results import main

if __name__ == "__main__":
    sys.exit(main())
