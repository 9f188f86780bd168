"""Results table of finished runs: ``python scripts/results.py lightning_logs [--markdown]``."""

import sys

try:
    from cifar_resnet.cli.results import main

    if __name__ == "__main__":
        sys.exit(main())
except KeyboardInterrupt:  # Ctrl-C while torch and Lightning load, or before the script handles signals itself
    print("results.py: stopped by SIGINT (Ctrl-C)", file=sys.stderr)
    sys.exit(130)
