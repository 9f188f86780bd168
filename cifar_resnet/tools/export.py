"""A checkpoint's model as a plain file (TorchScript, ONNX or a state dict).

Every format is checked after writing: reloaded without Lightning and compared with the checkpoint's
model on random inputs. A JSON sidecar (``<file>.json``) records architecture, classes and preprocessing.
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
from cifar_resnet.models import create_model
from cifar_resnet.tools.inference import TrainedModel, load_trained_model

FORMATS = {"torchscript": ".pt", "onnx": ".onnx", "state_dict": ".pth"}
ONNX_MISSING = "--format onnx needs the packages onnx and onnxscript: pip install -e .[onnx]"


def metadata(trained: TrainedModel) -> dict[str, Any]:
    """What a user of the exported file needs to know: the model and its input preprocessing."""
    return {
        "arch": trained.arch,
        "num_classes": trained.num_classes,
        "classes": list(trained.classes),
        "mean": list(trained.mean),
        "std": list(trained.std),
        "input": f"float32 (N, 3, {IMAGE_SIZE}, {IMAGE_SIZE}) RGB in [0, 1], then (x - mean) / std per channel",
        "output": "logits (N, num_classes); softmax gives probabilities",
    }


def _sample(n: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed))


def export_torchscript(trained: TrainedModel, out: Path) -> None:
    # Tracing is exact for these ResNets (no data-dependent control flow). torch marks TorchScript as
    # deprecated; the warning says nothing the user can act on here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        traced = torch.jit.trace(trained.model, _sample(2), check_trace=False)
        torch.jit.save(traced, str(out), _extra_files={"metadata.json": json.dumps(metadata(trained))})


def export_onnx(trained: TrainedModel, out: Path) -> None:
    if importlib.util.find_spec("onnx") is None or importlib.util.find_spec("onnxscript") is None:
        raise UserError(ONNX_MISSING)
    batch = torch.export.Dim("batch", min=1)
    torch.onnx.export(
        trained.model,
        (_sample(2),),
        str(out),
        input_names=["input"],
        output_names=["logits"],
        dynamic_shapes=({0: batch},),
        external_data=False,
    )


def export_state_dict(trained: TrainedModel, out: Path) -> None:
    torch.save({"state_dict": trained.model.state_dict(), **metadata(trained)}, out)


def reload_outputs(fmt: str, path: Path, inputs: torch.Tensor) -> torch.Tensor | None:
    """The exported file's logits on ``inputs``, loaded without Lightning; None when it cannot be run here."""
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            model = torch.jit.load(str(path), map_location="cpu")
        with torch.inference_mode():
            return model(inputs)
    if fmt == "state_dict":
        saved = torch.load(path, map_location="cpu", weights_only=True)
        model = create_model(saved["arch"], num_classes=saved["num_classes"])
        model.load_state_dict(saved["state_dict"])
        with torch.inference_mode():
            return model.eval()(inputs)
    if importlib.util.find_spec("onnxruntime") is None:
        return None
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"input": inputs.numpy()})[0])


def export_checkpoint(ckpt_path: str | Path, fmt: str, out: str | Path | None = None) -> tuple[Path, str]:
    """Write the model file and its JSON sidecar, verify it; returns the path and a one-line check result."""
    if fmt not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}, got {fmt}")
    trained = load_trained_model(ckpt_path).to(torch.device("cpu"))
    ckpt_path = Path(ckpt_path)
    path = Path(out) if out else ckpt_path.with_name(f"{ckpt_path.stem}-{trained.arch}{FORMATS[fmt]}")
    path.parent.mkdir(parents=True, exist_ok=True)
    {"torchscript": export_torchscript, "onnx": export_onnx, "state_dict": export_state_dict}[fmt](trained, path)
    Path(f"{path}.json").write_text(json.dumps(metadata(trained), indent=2) + "\n")

    inputs = _sample(5, seed=1)
    with torch.inference_mode():
        expected = trained.model(inputs)
    got = reload_outputs(fmt, path, inputs)
    if got is None:
        return path, "not verified: onnxruntime is not installed (pip install -e .[onnx])"
    diff = float((got - expected).abs().max())
    if not torch.allclose(got, expected, rtol=1e-4, atol=1e-4):
        raise UserError(f"exported {fmt} model differs from the checkpoint's (max |diff| {diff:.3g}); not usable")
    return path, f"verified: outputs match the checkpoint's model on random inputs (max |diff| {diff:.2g})"
