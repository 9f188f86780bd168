"""Loss, accuracy and learning-rate curves of a run as PNGs, from its TensorBoard events."""

from __future__ import annotations

from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cifar_resnet.errors import UserError
from cifar_resnet.tools.plots import curves_figure, save_figure

# (file name, title, y label, tags): only tags present in the run are drawn.
PANELS = (
    ("loss.png", "Loss", "cross-entropy", ("train/loss_step", "train/loss", "val/loss")),
    ("accuracy.png", "Accuracy", "accuracy", ("train/acc", "val/acc", "val/acc_top5")),
    ("lr.png", "Learning rate", "learning rate", ("train/lr",)),
)


def read_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series of a run folder; all its event files (resumed runs add files), later values win."""
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run folder")
    if not any(run_dir.glob("events.out.tfevents.*")):
        raise UserError(
            f"{run_dir} holds no TensorBoard event files; pass a run folder like lightning_logs/<arch>/version_N"
        )
    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    series = {}
    for tag in accumulator.Tags()["scalars"]:
        by_step = {event.step: event.value for event in accumulator.Scalars(tag)}
        series[tag] = sorted(by_step.items())
    return series


def plot_run(
    run_dir: str | Path, out: str | Path | None = None, overwrite: bool = False
) -> tuple[list[Path], list[str]]:
    """Write loss.png, accuracy.png and lr.png into ``out`` (default ``run_dir/plots``); earlier plots are
    replaced only with ``overwrite``.

    Returns the files written and, for each one not written, a line saying why.
    """
    run_dir = Path(run_dir)
    series = read_scalars(run_dir)
    out_dir = Path(out) if out else run_dir / "plots"
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} is a file; pass a folder for the plots")
    existing = [name for name, *_ in PANELS if (out_dir / name).exists()]
    if existing and not overwrite:
        raise UserError(f"{out_dir / existing[0]} exists; pass --overwrite to replace the plots, or --out")
    written, skipped = [], []
    for name, title, ylabel, tags in PANELS:
        present = {tag: series[tag] for tag in tags if tag in series}
        if present:
            figure = curves_figure(present, f"{title} ({run_dir.parent.name}/{run_dir.name})", ylabel, "optimizer step")
            written.append(save_figure(figure, out_dir / name))
        else:
            skipped.append(f"{name} not written: the run logged none of {', '.join(tags)}")
    if not written:
        raise UserError(f"{run_dir} has none of the tags {', '.join(t for p in PANELS for t in p[3])}")
    return written, skipped
