"""Plot a run's curves: ``python scripts/plot.py lightning_logs/resnet20/version_0 [--out DIR]``."""

import sys

from cifar_resnet.cli.plot import main

if __name__ == "__main__":
    sys.exit(main())
