"""Classify image files: ``python scripts/predict.py --ckpt_path PATH IMAGE_OR_DIR... [--topk 3] [--json]``."""

import sys

try:
    from cifar_resnet.cli.predict import main

    if __name__ == "__main__":
        sys.exit(main())
except KeyboardInterrupt:  # Ctrl-C while torch and Lightning load, or before the script handles signals itself
    print("predict.py: stopped by SIGINT (Ctrl-C)", file=sys.stderr)
    sys.exit(130)
