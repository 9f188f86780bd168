"""A checkpoint's model as a plain file: TorchScript, ONNX, safetensors or a state dict.

Every exported model takes RGB images in [0, 1] and normalises them itself, as :func:`load_model` does.
Each file is checked after writing: reloaded without Lightning and compared with the checkpoint's model
on random images. A JSON sidecar (``<file>.json``) records architecture, classes and preprocessing.
"""

from __future__ import annotations

import importlib.util
import json
import warnings
from pathlib import Path
from typing import Any

import torch

from cifar_resnet.data.sources import IMAGE_SIZE
from cifar_resnet.errors import UserError
from cifar_resnet.tools.inference import NormalizedClassifier, TrainedModel, load_model, load_trained_model

FORMATS = {"torchscript": ".pt", "onnx": ".onnx", "safetensors": ".safetensors", "state_dict": ".pth"}
ONNX_MISSING = "--format onnx needs the packages onnx and onnxscript: pip install -e .[onnx]"


def metadata(trained: TrainedModel) -> dict[str, Any]:
    """What a user of the exported file needs to know: the model and its input."""
    return {
        "arch": trained.arch,
        "num_classes": trained.num_classes,
        "classes": list(trained.classes),
        "mean": list(trained.mean),
        "std": list(trained.std),
        "input": f"float32 (N, 3, {IMAGE_SIZE}, {IMAGE_SIZE}) RGB in [0, 1]; the model normalises it with mean/std",
        "output": "logits (N, num_classes); softmax gives probabilities",
    }


def _sample(n: int = 4, seed: int = 0) -> torch.Tensor:
    """Random images in [0, 1]."""
    return torch.rand(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed))


class _ScriptedClassifier(torch.nn.Module):
    """The traced network behind a scripted front: TorchScript keeps its ``classes`` and its input check, which a
    trace alone would drop (tracing records tensor operations only). TorchScript infers ``classes`` as a list of
    strings from its value."""

    def __init__(self, traced: torch.nn.Module, classes: list[str]) -> None:
        super().__init__()
        self.network = traced
        self.classes = classes

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if not images.is_floating_point():
            raise TypeError("images must be floats in [0, 1] (N, 3, 32, 32): divide uint8 pixels by 255 first")
        return self.network(images)


def export_torchscript(trained: TrainedModel, classifier: NormalizedClassifier, out: Path) -> None:
    # Tracing is exact for these ResNets (no data-dependent control flow). torch marks TorchScript as
    # deprecated; the warning says nothing the user can act on here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        traced = torch.jit.trace(classifier, _sample(2), check_trace=False)
        scripted = torch.jit.script(_ScriptedClassifier(traced, list(trained.classes)))
        torch.jit.save(scripted, str(out), _extra_files={"metadata.json": json.dumps(metadata(trained))})


def export_onnx(trained: TrainedModel, classifier: NormalizedClassifier, out: Path) -> None:
    if importlib.util.find_spec("onnx") is None or importlib.util.find_spec("onnxscript") is None:
        raise UserError(ONNX_MISSING)
    batch = torch.export.Dim("batch", min=1)
    torch.onnx.export(
        classifier,
        (_sample(2),),
        str(out),
        input_names=["input"],
        output_names=["logits"],
        dynamic_shapes=({0: batch},),
        external_data=False,
    )


def export_safetensors(trained: TrainedModel, classifier: NormalizedClassifier, out: Path) -> None:
    from safetensors.torch import save_file

    weights = {k: v.contiguous() for k, v in trained.model.state_dict().items()}
    save_file(weights, str(out), metadata={"cifar_resnet": json.dumps(metadata(trained))})


def export_state_dict(trained: TrainedModel, classifier: NormalizedClassifier, out: Path) -> None:
    torch.save({"state_dict": trained.model.state_dict(), **metadata(trained)}, out)


def reload_outputs(fmt: str, path: Path, images: torch.Tensor) -> torch.Tensor | None:
    """The exported file's logits on ``images``, loaded without Lightning; None when it cannot be run here."""
    if fmt != "onnx":
        with torch.inference_mode():
            return load_model(path)(images)
    if importlib.util.find_spec("onnxruntime") is None:
        return None
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"input": images.numpy()})[0])


def export_path(ckpt_path: Path, fmt: str, out: str | Path | None, overwrite: bool, arch: str) -> Path:
    """Where to write: ``--out``, else beside the checkpoint; never over the checkpoint, never silently over a file."""
    path = Path(out) if out else ckpt_path.with_name(f"{ckpt_path.stem}-{arch}{FORMATS[fmt]}")
    if path.exists() and path.resolve() == ckpt_path.resolve():
        raise UserError(f"--out {path} is the checkpoint itself; choose another file name")
    if path.is_dir():
        raise UserError(f"--out {path} is a directory; give a file name, e.g. {path / (arch + FORMATS[fmt])}")
    for target in (path, Path(f"{path}.json")):
        if target.exists() and not overwrite:
            raise UserError(f"{target} exists; pass --overwrite to replace it, or choose another --out")
    return path


def export_checkpoint(
    ckpt_path: str | Path, fmt: str, out: str | Path | None = None, overwrite: bool = False
) -> tuple[Path, str]:
    """Write the model file and its JSON sidecar, verify it; returns the path and a one-line check result."""
    if fmt not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}, got {fmt}")
    trained = load_trained_model(ckpt_path).to(torch.device("cpu"))
    ckpt_path = Path(ckpt_path)
    path = export_path(ckpt_path, fmt, out, overwrite, trained.arch)
    path.parent.mkdir(parents=True, exist_ok=True)
    classifier = trained.classifier()
    writer = {"torchscript": export_torchscript, "onnx": export_onnx, "safetensors": export_safetensors,
              "state_dict": export_state_dict}[fmt]  # fmt: skip
    writer(trained, classifier, path)
    Path(f"{path}.json").write_text(json.dumps(metadata(trained), indent=2) + "\n")

    images = _sample(5, seed=1)
    with torch.inference_mode():
        expected = classifier(images)
    got = reload_outputs(fmt, path, images)
    if got is None:
        return path, "not verified: onnxruntime is not installed (pip install -e .[onnx])"
    diff = float((got - expected).abs().max())
    if not torch.allclose(got, expected, rtol=1e-4, atol=1e-4):
        raise UserError(f"exported {fmt} model differs from the checkpoint's (max |diff| {diff:.3g}); not usable")
    return path, f"verified: outputs match the checkpoint's model on random images (max |diff| {diff:.2g})"
