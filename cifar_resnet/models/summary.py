"""Model summaries: parameter counts, multiply-accumulates and a per-layer table.

MACs are measured, not estimated: one forward pass of a ``1x3x32x32`` input under
``torch.utils.flop_counter.FlopCounterMode`` (which counts convolutions and matmuls, 2 flops per MAC).
Normalisation, activations, pooling and additions are not counted, as is customary.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .registry import create_model, list_models

CIFAR_INPUT: tuple[int, int, int, int] = (1, 3, 32, 32)


@dataclass(frozen=True)
class LayerRow:
    """One line of a layer table."""

    name: str
    type: str
    output_shape: tuple[int, ...] | None
    params: int


@dataclass(frozen=True)
class ModelRow:
    """Size and cost of one registered model."""

    name: str
    params: int
    macs: int


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (all, or only those with ``requires_grad``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


@contextmanager
def _eval_no_grad(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and no autograd for the block; the previous train/eval mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)


def _probe_input(model: nn.Module, input_size: tuple[int, ...]) -> torch.Tensor:
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    return torch.zeros(input_size, device=device)


def count_macs(model: nn.Module, input_size: tuple[int, ...] = CIFAR_INPUT) -> int:
    """Multiply-accumulates of one forward pass on ``input_size`` (FLOPs / 2)."""
    with _eval_no_grad(model), FlopCounterMode(display=False) as counter:
        model(_probe_input(model, input_size))
    return counter.get_total_flops() // 2


def _shape_of(output: object) -> tuple[int, ...] | None:
    if isinstance(output, torch.Tensor):
        return tuple(output.shape)
    if isinstance(output, list | tuple) and output and isinstance(output[0], torch.Tensor):
        return tuple(output[0].shape)
    return None


def _table_modules(model: nn.Module, depth: int) -> Iterator[tuple[str, nn.Module]]:
    """Modules exactly ``depth`` levels down, plus shallower leaves (e.g. a top-level ``fc``)."""
    for name, module in model.named_modules():
        if not name:
            continue
        level = name.count(".") + 1
        if level == depth or (level < depth and not any(True for _ in module.children())):
            yield name, module


def layer_table(model: nn.Module, input_size: tuple[int, ...] = CIFAR_INPUT, depth: int = 1) -> list[LayerRow]:
    """Rows in execution order for the modules ``depth`` levels down (1 = top-level children).

    A module called twice (e.g. a shared ReLU) gives one row per call.
    """
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    rows: list[LayerRow] = []
    handles = []

    def add_hook(name: str, module: nn.Module) -> None:
        def hook(mod: nn.Module, _inputs: object, output: object) -> None:
            rows.append(LayerRow(name, type(mod).__name__, _shape_of(output), count_params(mod)))

        handles.append(module.register_forward_hook(hook))

    for name, module in _table_modules(model, depth):
        add_hook(name, module)
    try:
        with _eval_no_grad(model):
            model(_probe_input(model, input_size))
    finally:
        for handle in handles:
            handle.remove()
    return rows


def format_macs(macs: int) -> str:
    """``556.65 M`` / ``1.298 G`` style."""
    return f"{macs / 1e9:.3f} G" if macs >= 1e9 else f"{macs / 1e6:.2f} M"


def model_row(arch: str, input_size: tuple[int, ...] = CIFAR_INPUT, num_classes: int = 10) -> ModelRow:
    """Params and MACs of one registered model (10 classes by default)."""
    model = create_model(arch, num_classes=num_classes)
    return ModelRow(arch, count_params(model), count_macs(model, input_size))


def model_rows(
    archs: Iterable[str] | None = None, input_size: tuple[int, ...] = CIFAR_INPUT, num_classes: int = 10
) -> list[ModelRow]:
    """:func:`model_row` for ``archs`` (default: every registered model, family then depth)."""
    names = list_models() if archs is None else list(archs)
    return [model_row(a, input_size, num_classes) for a in names]
