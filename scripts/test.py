"""Evaluate a checkpoint on the test split: ``python scripts/test.py --ckpt_path PATH [--tta] [--split val]``."""

import sys

from cifar_resnet.evaluate import test_main

if __name__ == "__main__":
    sys.exit(test_main())
