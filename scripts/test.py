"""Evaluate a checkpoint on the test split: ``python scripts/test.py --ckpt_path PATH [--tta] [--split val]``."""

import sys

try:
    from cifar_resnet.cli.test import main

    if __name__ == "__main__":
        sys.exit(main())
except KeyboardInterrupt:  # Ctrl-C while torch and Lightning load, or before the script handles signals itself
    print("test.py: stopped by SIGINT (Ctrl-C)", file=sys.stderr)
    sys.exit(130)
