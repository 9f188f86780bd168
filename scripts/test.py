"""Evaluate a checkpoint on the test split: ``python scripts/test.py --ckpt_path PATH [--tta] [--split val]``."""

import sys

from cifar_resnet.cli.test import main

if __name__ == "__main__":
    sys.exit(main())
