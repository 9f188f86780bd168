"""Throughput of our pipeline and training step against plain baselines: ``python scripts/benchmark.py``."""

import sys

try:
    from cifar_resnet.cli.benchmark import main

    if __name__ == "__main__":
        sys.exit(main())
except KeyboardInterrupt:  # Ctrl-C while torch and Lightning load, or before the script handles signals itself
    print("benchmark.py: stopped by SIGINT (Ctrl-C)", file=sys.stderr)
    sys.exit(130)
