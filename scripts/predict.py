"""Classify image files: ``python scripts/predict.py --ckpt_path PATH IMAGE_OR_DIR... [--topk 3] [--json]``."""

import sys

from cifar_resnet.cli.predict import main

if __name__ == "__main__":
    sys.exit(main())
