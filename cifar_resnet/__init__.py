"""ResNets on CIFAR-10 with PyTorch Lightning."""

__version__ = "0.1.0"
