"""Train a ResNet on CIFAR-10: ``python scripts/fit.py --arch resnet50 --max_epochs 200``."""

import sys

from cifar_resnet.cli.fit import main

if __name__ == "__main__":
    sys.exit(main())
