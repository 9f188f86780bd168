"""Print a model's layer table, parameter count and MACs, or one table of every registered model."""

import sys

try:
    from cifar_resnet.cli.summary import main

    if __name__ == "__main__":
        sys.exit(main())
except KeyboardInterrupt:  # Ctrl-C while torch and Lightning load, or before the script handles signals itself
    print("summary.py: stopped by SIGINT (Ctrl-C)", file=sys.stderr)
    sys.exit(130)
