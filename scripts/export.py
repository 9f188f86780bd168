"""Export a checkpoint's model: ``python scripts/export.py --ckpt_path PATH --format torchscript|onnx|state_dict``."""

import sys

from cifar_resnet.cli.export import main

if __name__ == "__main__":
    sys.exit(main())
