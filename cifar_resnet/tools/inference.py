"""A trained checkpoint as a plain model: architecture, weights, class names and preprocessing."""

from __future__ import annotations

import json
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present
from torchvision.datasets.folder import find_classes

from cifar_resnet.data.augment import Normalize
from cifar_resnet.data.sources import CIFAR10_CLASSES, CIFAR10_MEAN, CIFAR10_STD, detect_source
from cifar_resnet.errors import UserError
from cifar_resnet.models import create_model
from cifar_resnet.training.runs import checkpoint_hparams, read_checkpoint, unloadable_reason

# Prefixes that wrappers put in front of the backbone's keys: the LightningModule attribute, DDP/DataParallel
# and torch.compile.
_KEY_PREFIXES = ("model.", "module.", "_orig_mod.")


def auto_device() -> torch.device:
    """CUDA when available, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def clean_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys of the bare backbone: wrapper prefixes stripped, metric states and other module state dropped."""
    lightning = any(k.startswith("model.") for k in state_dict)
    out = OrderedDict((k, v) for k, v in state_dict.items() if not lightning or k.startswith("model."))
    for prefix in _KEY_PREFIXES:
        consume_prefix_in_state_dict_if_present(out, prefix)
    return dict(out)


class NormalizedClassifier(nn.Module):
    """A classifier of RGB images in [0, 1], ``(N, 3, 32, 32)``: it normalises them itself and returns logits.

    ``classes`` names the outputs; ``mean`` and ``std`` are the normalisation the network was trained with.
    """

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float], classes: Sequence[str]) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        self.classes = tuple(classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if not images.is_floating_point():
            raise TypeError(
                f"images must be floats in [0, 1] (N, 3, 32, 32), got {images.dtype}: divide uint8 pixels by 255 "
                "first (or use the model's Normalize on them)"
            )
        return self.model((images - self.mean) / self.std)


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

    def classifier(self) -> NormalizedClassifier:
        """The backbone behind its normalisation: a model of images in [0, 1]."""
        return NormalizedClassifier(self.model, self.mean, self.std, self.classes).eval()

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


def load_model(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """A trained model of RGB images in [0, 1] ``(N, 3, 32, 32)`` that returns logits, in eval mode.

    ``path`` is a checkpoint written by ``scripts/fit.py``, or a file written by ``scripts/export.py``: a
    state dict (``.pth``), safetensors, or TorchScript (returned as the scripted module). Either way the model's
    ``classes`` name the outputs. uint8 images are refused (a TypeError): pass floats in [0, 1].
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        return _from_safetensors(path).to(device)
    if _is_torchscript(path):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch marks TorchScript as deprecated
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.load(str(path), map_location=device).eval()
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # another kind of file, a truncated one, or one that carries code
        raise UserError(f"{path} is not a model file of fit.py or export.py ({unloadable_reason(path, err)})") from err
    if isinstance(saved, dict) and "hyper_parameters" in saved:
        return load_trained_model(path).classifier().to(device)
    if isinstance(saved, dict) and {"arch", "num_classes", "state_dict"} <= set(saved):
        return _classifier(saved["arch"], saved["num_classes"], saved["state_dict"], saved, path).to(device)
    raise UserError(f"{path} is neither a checkpoint of fit.py nor a file of export.py")


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("constants.pkl") or "/code/" in name for name in archive.namelist())


def _classifier(arch: str, num_classes: int, state: dict[str, torch.Tensor], meta: dict[str, Any], path: Path
                ) -> NormalizedClassifier:  # fmt: skip
    model = create_model(arch, num_classes=int(num_classes))
    try:
        model.load_state_dict(clean_state_dict(state))
    except RuntimeError as err:
        raise UserError(f"{path}: weights do not fit {arch} ({str(err).splitlines()[0]})") from err
    classes = meta.get("classes") or [f"class_{k}" for k in range(int(num_classes))]
    return NormalizedClassifier(model, meta.get("mean", CIFAR10_MEAN), meta.get("std", CIFAR10_STD), classes).eval()


def _from_safetensors(path: Path) -> NormalizedClassifier:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        header = f.metadata() or {}
    if "cifar_resnet" not in header:
        raise UserError(f"{path}: a safetensors file without the metadata export.py writes (arch, classes)")
    meta = json.loads(header["cifar_resnet"])
    return _classifier(meta["arch"], meta["num_classes"], load_file(str(path)), meta, path)
