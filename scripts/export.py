"""Export a checkpoint's model: ``python scripts/export.py --ckpt_path PATH --format torchscript|onnx|state_dict``."""

import sys

from cifar_resnet.export import export_main

if __name__ == "__main__":
    sys.exit(export_main())
