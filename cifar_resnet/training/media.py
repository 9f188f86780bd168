"""Images and figures to whichever logger a run has, each through that logger's own API.

TensorBoard: ``add_image`` / ``add_figure``. MLflow: ``log_image`` / ``log_figure`` as run artifacts
(``<name>_step<N>.png``). W&B: ``WandbLogger.log_image``. The CSV logger keeps numbers only: the first
image or figure it is handed is skipped with one info line, the rest silently. A logger that fails to take an
image never stops training: a picture is not worth a run, so the failure is one warning and the images stop.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn


def _kind(logger: Logger) -> str:
    """tensorboard, mlflow, wandb or other, by class (the optional loggers are checked by name: importing their
    module would import their package)."""
    if isinstance(logger, TensorBoardLogger):
        return "tensorboard"
    names = {cls.__name__ for cls in type(logger).__mro__}
    if "MLFlowLogger" in names:
        return "mlflow"
    if "WandbLogger" in names:
        return "wandb"
    return "other"


class MediaLog:
    """Sends images and figures to a trainer's loggers; remembers which loggers cannot take them."""

    def __init__(self) -> None:
        self._skipped: set[int] = set()

    def _loggers(self, trainer: L.Trainer) -> list[Logger]:
        return list(trainer.loggers) if trainer.is_global_zero else []

    def _skip(self, logger: Logger, why: str) -> None:
        if id(logger) not in self._skipped:
            self._skipped.add(id(logger))
            rank_zero_info(why)

    def wanted(self, trainer: L.Trainer) -> bool:
        """Whether any logger takes images (so a figure is worth drawing); says once of those that do not."""
        takers = False
        for logger in self._loggers(trainer):
            if _kind(logger) == "other":
                self._skip(logger, f"{type(logger).__name__} keeps numbers only: images and figures are not logged")
            takers = takers or id(logger) not in self._skipped
        return takers

    def image(self, trainer: L.Trainer, key: str, image: torch.Tensor, step: int) -> None:
        """A ``(3, H, W)`` image in [0, 1]."""
        for logger in self._loggers(trainer):
            self._send(logger, key, step, image=image)

    def figure(self, trainer: L.Trainer, key: str, figure: Any, step: int) -> None:
        """A matplotlib figure (closed afterwards)."""
        import matplotlib.pyplot as plt

        try:
            for logger in self._loggers(trainer):
                self._send(logger, key, step, figure=figure)
        finally:
            plt.close(figure)

    def _send(self, logger: Logger, key: str, step: int, image: torch.Tensor | None = None, figure: Any = None) -> None:
        if id(logger) in self._skipped:
            return
        kind = _kind(logger)
        try:
            if kind == "tensorboard":
                if image is not None:
                    logger.experiment.add_image(key, image, global_step=step)
                else:
                    logger.experiment.add_figure(key, figure, global_step=step, close=False)
            elif kind == "mlflow":
                name = f"{key}_step{step:07d}.png"
                if image is not None:
                    logger.experiment.log_image(logger.run_id, _hwc_uint8(image), name)
                else:
                    logger.experiment.log_figure(logger.run_id, figure, name)
            elif kind == "wandb":
                logger.log_image(key, [_hwc_uint8(image) if image is not None else _figure_pixels(figure)], step=step)
            else:
                self._skip(logger, f"{type(logger).__name__} keeps numbers only: images and figures are not logged")
        except Exception as err:  # see the module docstring
            self._skipped.add(id(logger))
            rank_zero_warn(f"{type(logger).__name__} could not log {key} ({type(err).__name__}: {err}); "
                           "no more images go to it this run")  # fmt: skip


def _hwc_uint8(image: torch.Tensor) -> np.ndarray:
    return (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def _figure_pixels(figure: Any) -> np.ndarray:
    """The figure rendered to an RGB array (W&B's own figure conversion goes through plotly, which may be missing)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(figure)  # the figures are built without pyplot, so they have no drawing canvas
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()
