"""Print a model's layer table, parameter count and MACs, or one table of every registered model."""

import sys

from cifar_resnet.cli.summary import main

if __name__ == "__main__":
    sys.exit(main())
