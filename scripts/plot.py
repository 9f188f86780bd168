"""Plot a run's curves: ``python scripts/plot.py lightning_logs/resnet20/version_0 [--out DIR]``."""

import sys

try:
    from cifar_resnet.cli.plot import main

    if __name__ == "__main__":
        sys.exit(main())
except KeyboardInterrupt:  # Ctrl-C while torch and Lightning load, or before the script handles signals itself
    print("plot.py: stopped by SIGINT (Ctrl-C)", file=sys.stderr)
    sys.exit(130)
