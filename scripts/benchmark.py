"""Throughput of our pipeline and training step against plain baselines: ``python scripts/benchmark.py``."""

import sys

from cifar_resnet.cli.benchmark import main

if __name__ == "__main__":
    sys.exit(main())
