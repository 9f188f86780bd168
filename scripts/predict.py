"""Classify image files: ``python scripts/predict.py --ckpt_path PATH IMAGE_OR_DIR... [--topk 3] [--json]``."""

import sys

from cifar_resnet.predict import predict_main

if __name__ == "__main__":
    sys.exit(predict_main())
