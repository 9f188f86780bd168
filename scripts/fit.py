"""Train a ResNet on CIFAR-10: ``python scripts/fit.py --arch resnet50 --max_epochs 200``."""

import sys

try:
    from cifar_resnet.cli.fit import main

    if __name__ == "__main__":
        sys.exit(main())
except KeyboardInterrupt:  # Ctrl-C while torch and Lightning load, or before the script handles signals itself
    print("fit.py: stopped by SIGINT (Ctrl-C)", file=sys.stderr)
    sys.exit(130)
