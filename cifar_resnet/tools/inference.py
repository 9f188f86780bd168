"""A trained checkpoint as a plain model: architecture, weights, class names and preprocessing."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.datasets.folder import find_classes

from cifar_resnet.data.augment import Normalize
from cifar_resnet.data.sources import CIFAR10_CLASSES, CIFAR10_MEAN, CIFAR10_STD, detect_source
from cifar_resnet.errors import UserError
from cifar_resnet.models import create_model
from cifar_resnet.training.runs import checkpoint_hparams, read_checkpoint

# Prefixes that wrappers put in front of the backbone's keys: the LightningModule attribute, DDP/DataParallel
# and torch.compile.
_KEY_PREFIXES = ("model.", "module.", "_orig_mod.")


def auto_device() -> torch.device:
    """CUDA when available, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def clean_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys of the bare backbone: wrapper prefixes stripped, metric states dropped."""
    lightning = any(k.startswith("model.") for k in state_dict)
    out = {}
    for key, value in state_dict.items():
        if lightning and not key.startswith("model."):  # metric states, anything else the module owns
            continue
        stripped = True
        while stripped:
            stripped = False
            for prefix in _KEY_PREFIXES:
                if key.startswith(prefix):
                    key, stripped = key[len(prefix) :], True
        out[key] = value
    return out


def _class_names(checkpoint: dict[str, Any], data_hparams: dict[str, Any], num_classes: int) -> tuple[str, ...]:
    """Stored class names; else the data folder's; else CIFAR-10's for 10 classes; else ``class_<k>``."""
    stored = checkpoint.get("classes")
    if stored and len(stored) == num_classes:
        return tuple(stored)
    data_dir = data_hparams.get("data_dir")
    if data_dir and detect_source(data_dir) == "imagefolder":
        names = find_classes(str(Path(data_dir) / "train"))[0]
        if len(names) == num_classes:
            return tuple(names)
    if num_classes == len(CIFAR10_CLASSES):
        return CIFAR10_CLASSES
    return tuple(f"class_{k}" for k in range(num_classes))


@dataclass
class TrainedModel:
    """A checkpoint's backbone in eval mode with what is needed to use it outside Lightning."""

    model: nn.Module
    arch: str
    num_classes: int
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    path: Path
    hparams: dict[str, Any] = field(default_factory=dict)
    data_hparams: dict[str, Any] = field(default_factory=dict)

    @property
    def normalize(self) -> Normalize:
        return Normalize(self.mean, self.std)

    def to(self, device: torch.device) -> TrainedModel:
        self.model.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def load_trained_model(path: str | Path) -> TrainedModel:
    """Build the checkpoint's architecture from its hyperparameters and load its weights (``weights_only``)."""
    path = Path(path)
    checkpoint = read_checkpoint(path)
    hparams = checkpoint_hparams(checkpoint)
    if "arch" not in hparams or "num_classes" not in hparams:
        raise UserError(f"--ckpt_path {path} has no arch/num_classes hyperparameters; was it written by fit.py?")
    arch, num_classes = hparams["arch"], int(hparams["num_classes"])
    model = create_model(arch, num_classes=num_classes)
    try:
        model.load_state_dict(clean_state_dict(checkpoint["state_dict"]))
    except RuntimeError as err:
        raise UserError(f"--ckpt_path {path}: weights do not fit {arch} ({str(err).splitlines()[0]})") from err
    model.eval()
    data_hparams = dict(checkpoint.get("datamodule_hyper_parameters", {}))
    norm = checkpoint.get("normalization", {})
    return TrainedModel(
        model=model,
        arch=arch,
        num_classes=num_classes,
        classes=_class_names(checkpoint, data_hparams, num_classes),
        mean=tuple(norm.get("mean", CIFAR10_MEAN)),
        std=tuple(norm.get("std", CIFAR10_STD)),
        path=path,
        hparams=hparams,
        data_hparams=data_hparams,
    )


@torch.inference_mode()
def predict_logits_and_probs(
    trained: TrainedModel, images: torch.Tensor, batch_size: int = 512, tta: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and softmax probabilities of uint8 ``(N, 3, 32, 32)`` images, on the CPU.

    With ``tta`` the probabilities are the mean of the image's and its horizontal mirror's softmax, and the
    returned logits are their log (so argmax and cross-entropy follow the averaged prediction).
    """
    trained.model.eval()
    device, normalize = trained.device, trained.normalize
    logits_out, probs_out = [], []
    for start in range(0, images.shape[0], batch_size):
        x = normalize(images[start : start + batch_size].to(device))
        logits = trained.model(x).float()
        probs = F.softmax(logits, dim=1)
        if tta:
            probs = (probs + F.softmax(trained.model(x.flip(3)).float(), dim=1)) / 2
            logits = probs.clamp_min(torch.finfo(probs.dtype).tiny).log()
        logits_out.append(logits.cpu())
        probs_out.append(probs.cpu())
    if not logits_out:
        empty = torch.empty(0, trained.num_classes)
        return empty, empty.clone()
    return torch.cat(logits_out), torch.cat(probs_out)
