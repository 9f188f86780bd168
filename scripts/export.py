"""Export a checkpoint's model: ``python scripts/export.py --ckpt_path PATH --format torchscript|onnx|state_dict``."""

import sys

try:
    from cifar_resnet.cli.export import main

    if __name__ == "__main__":
        sys.exit(main())
except KeyboardInterrupt:  # Ctrl-C while torch and Lightning load, or before the script handles signals itself
    print("export.py: stopped by SIGINT (Ctrl-C)", file=sys.stderr)
    sys.exit(130)
