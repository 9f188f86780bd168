"""Loss, accuracy and learning-rate curves of a run as PNGs, from its TensorBoard events, metrics.csv or MLflow
file store."""

from __future__ import annotations

import csv
import json
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


def _tensorboard_scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {
        tag: {event.step: event.value for event in accumulator.Scalars(tag)} for tag in accumulator.Tags()["scalars"]
    }


def _csv_scalars(path: Path) -> dict[str, dict[int, float]]:
    """Lightning's ``metrics.csv``: one row per logging call, a ``step`` column, empty cells for absent metrics."""
    series: dict[str, dict[int, float]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            if not row.get("step"):
                continue
            step = int(float(row["step"]))
            for tag, value in row.items():
                if tag != "step" and tag is not None and value not in (None, ""):
                    series.setdefault(tag, {})[step] = float(value)
    return series


def _mlflow_file_scalars(store: Path, run_id: str | None) -> dict[str, dict[int, float]]:
    """The metrics of a run in an MLflow file store, ``<experiment>/<run>/metrics/<key>`` with lines ``time value
    step``. Read as files, because mlflow is an optional install and its file store is a frozen format."""
    runs = [p for p in store.glob(f"*/{run_id or '*'}/metrics") if p.is_dir()]
    series: dict[str, dict[int, float]] = {}
    for metrics in runs:
        for file in sorted(p for p in metrics.rglob("*") if p.is_file()):
            tag = file.relative_to(metrics).as_posix()
            for line in file.read_text().splitlines():
                parts = line.split()
                if len(parts) >= 3:
                    series.setdefault(tag, {})[int(parts[2])] = float(parts[1])
    return series


def read_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series of a run folder, from what its ``--logger`` wrote there: TensorBoard event files (all
    of them: resumed runs add files), ``metrics.csv``, or the local MLflow store ``mlruns/``; later values of a
    step win. W&B runs and MLflow runs on a server are read with their own tools."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run folder")
    found: list[dict[str, dict[int, float]]] = []
    if any(run_dir.glob("events.out.tfevents.*")):
        found.append(_tensorboard_scalars(run_dir))
    if (run_dir / "metrics.csv").is_file():
        found.append(_csv_scalars(run_dir / "metrics.csv"))
    if (run_dir / "mlruns").is_dir():
        record = run_dir / "mlflow_run.json"
        run_id = json.loads(record.read_text()).get("run_id") if record.is_file() else None
        found.append(_mlflow_file_scalars(run_dir / "mlruns", run_id))
    if not found:
        wandb = " (a W&B run: see it in W&B, after wandb sync for offline runs)" if (run_dir / "wandb").is_dir() else ""
        raise UserError(
            f"{run_dir} holds no TensorBoard event files, metrics.csv or mlruns/{wandb}; pass a run folder like "
            "lightning_logs/<arch>/version_N"
        )
    merged: dict[str, dict[int, float]] = {}
    for series in found:
        for tag, values in series.items():
            merged.setdefault(tag, {}).update(values)
    return {tag: sorted(values.items()) for tag, values in merged.items()}


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
