"""Evaluate a checkpoint on the test (or validation) split and write a report folder.

Top-1/top-5 accuracy, loss, per-class accuracy, confusion matrix, expected calibration error, the most
confidently misclassified images and every prediction; metrics come from torchmetrics.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy, MulticlassCalibrationError, MulticlassConfusionMatrix

from cifar_resnet.config import upgrade_names
from cifar_resnet.data.datamodule import CIFARDataModule
from cifar_resnet.data.sources import ImageSplit
from cifar_resnet.errors import UserError
from cifar_resnet.tables import format_table
from cifar_resnet.tools.inference import TrainedModel, auto_device, load_trained_model, predict_logits_and_probs
from cifar_resnet.tools.plots import confusion_figure, misclassified_figure, save_figure

CALIBRATION_BINS = 15


@dataclass
class Evaluation:
    """Headline numbers and per-image results of one evaluation."""

    split: str
    tta: bool
    count: int
    top1: float
    top5: float
    top5_k: int
    loss: float
    ece: float
    classes: tuple[str, ...]
    per_class_acc: list[float]
    per_class_count: list[int]
    confusion: torch.Tensor  # (C, C) counts, rows true, columns predicted
    labels: torch.Tensor
    probs: torch.Tensor

    def summary(self) -> dict[str, Any]:
        return {
            "split": self.split,
            "tta": self.tta,
            "images": self.count,
            "top1_acc": self.top1,
            "top5_acc": self.top5,
            "top5_k": self.top5_k,
            "loss": self.loss,
            "ece": self.ece,
            "calibration_bins": CALIBRATION_BINS,
            "per_class_acc": dict(zip(self.classes, self.per_class_acc, strict=True)),
            "per_class_count": dict(zip(self.classes, self.per_class_count, strict=True)),
        }


def evaluate_split(trained: TrainedModel, split: ImageSplit, split_name: str, tta: bool, batch_size: int) -> Evaluation:
    """Every image of ``split`` counted once; metrics from the (TTA-averaged) softmax probabilities."""
    logits, probs = predict_logits_and_probs(trained, split.images, batch_size=batch_size, tta=tta)
    labels = split.labels
    c = trained.num_classes
    k = min(5, c)
    per_class = MulticlassAccuracy(c, average=None)(probs, labels)
    per_class_count = torch.bincount(labels, minlength=c)
    # Classes absent from the split have no accuracy: NaN, not torchmetrics' 0.
    per_class = torch.where(per_class_count > 0, per_class, torch.nan)
    return Evaluation(
        split=split_name,
        tta=tta,
        count=len(labels),
        top1=float(MulticlassAccuracy(c, top_k=1, average="micro")(probs, labels)),
        top5=float(MulticlassAccuracy(c, top_k=k, average="micro")(probs, labels)),
        top5_k=k,
        loss=float(F.cross_entropy(logits, labels)),
        ece=float(MulticlassCalibrationError(c, n_bins=CALIBRATION_BINS, norm="l1")(probs, labels)),
        classes=trained.classes,
        per_class_acc=[float(v) for v in per_class],
        per_class_count=[int(v) for v in per_class_count],
        confusion=MulticlassConfusionMatrix(c)(probs, labels),
        labels=labels,
        probs=probs,
    )


def load_eval_split(trained: TrainedModel, data_dir: str | None, split: str, cache_dir: str | None) -> ImageSplit:
    """The checkpoint's data (same source, validation size and seed), or ``data_dir`` instead."""
    hp = upgrade_names(trained.data_hparams)
    data_dir = data_dir or hp.get("data_dir")
    if data_dir is None:
        raise UserError(f"--ckpt_path {trained.path} does not record its data; pass --data_dir")
    dataset = str(hp.get("dataset", "auto"))
    if split == "test" and (Path(data_dir) / "test").is_dir():
        dataset = "imagefolder"  # DIR/test/<class>/* is enough: a held-out folder needs no training split
    datamodule = CIFARDataModule(
        data_dir=data_dir,
        dataset=dataset,
        val_size=int(hp.get("val_size", 5000)),
        seed=int(hp.get("seed", 0)),
        cache_dir=cache_dir,
    )
    if split == "test" and not datamodule.has_test_split:
        raise UserError(
            f"{data_dir} has no test split ({data_dir}/test/<class>/* is missing); pass --split val to evaluate "
            "on the held-out validation split (same seed, same images), or --data_dir with a test split"
        )
    chosen = datamodule.load_test_split() if split == "test" else _validation_split(datamodule)
    if chosen is None or len(chosen) == 0:
        raise UserError(f"the {split} split of {data_dir} is empty (the checkpoint was trained with --val_size 0?)")
    if list(chosen.classes) != list(trained.classes):
        raise UserError(
            f"{data_dir} has the classes {', '.join(chosen.classes)}, but --ckpt_path {trained.path} was trained on "
            f"{', '.join(trained.classes)}: its outputs would be read as the wrong classes; evaluate on data with "
            "the checkpoint's class folders"
        )
    return chosen


def _validation_split(datamodule: CIFARDataModule) -> ImageSplit | None:
    datamodule.setup("validate")
    return datamodule.val_split


REPORT_FILES = ("metrics.json", "report.txt", "per_class.csv", "confusion_matrix.csv", "confusion_matrix.png",
                "predictions.csv", "misclassified.png")  # fmt: skip


def check_out_dir(out: Path, overwrite: bool) -> None:
    """A report folder may be new or empty; replacing an earlier report needs ``overwrite``."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; pass a folder for the report")
    existing = [name for name in REPORT_FILES if (out / name).exists()]
    if existing and not overwrite:
        raise UserError(f"{out} already holds a report ({existing[0]}, ...); pass --overwrite to replace it, or --out")


def default_out_dir(ckpt_path: Path, split: str, tta: bool) -> Path:
    """``<run>/eval-<ckpt stem>[-val][-tta]``: beside the run's ``checkpoints/`` folder."""
    name = f"eval-{ckpt_path.stem}" + ("-val" if split == "val" else "") + ("-tta" if tta else "")
    return ckpt_path.resolve().parent.parent / name


def write_report(
    result: Evaluation, images: torch.Tensor, out: Path, worst: int = 32, sources: Sequence[str] | None = None
) -> list[Path]:
    """metrics.json, per_class.csv, confusion_matrix.{csv,png}, predictions.csv and misclassified.png."""
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "metrics.json"]
    (out / "metrics.json").write_text(json.dumps(result.summary(), indent=2) + "\n")

    with open(out / "per_class.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["class", "images", "correct", "accuracy"])
        for i, name in enumerate(result.classes):
            writer.writerow([name, result.per_class_count[i], int(result.confusion[i, i]), result.per_class_acc[i]])
    with open(out / "confusion_matrix.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["true \\ predicted", *result.classes])
        for name, row in zip(result.classes, result.confusion.tolist(), strict=True):
            writer.writerow([name, *row])
    confidence, predicted = result.probs.max(dim=1)
    with open(out / "predictions.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["index", "file", "true", "predicted", "confidence", "correct"])
        files = sources if sources is not None else [""] * len(result.labels)
        for i, (file, t, p, conf) in enumerate(
            zip(files, result.labels.tolist(), predicted.tolist(), confidence.tolist(), strict=True)
        ):
            writer.writerow([i, file, result.classes[t], result.classes[p], f"{conf:.6f}", int(t == p)])
    written += [out / "per_class.csv", out / "confusion_matrix.csv", out / "predictions.csv"]

    split_name = f"{result.split} split" + (", flip TTA" if result.tta else "")
    written.append(
        save_figure(confusion_figure(result.confusion, result.classes, f"Confusion matrix ({split_name})"),
                    out / "confusion_matrix.png")
    )  # fmt: skip
    wrong = torch.nonzero(predicted != result.labels, as_tuple=True)[0]
    wrong = wrong[confidence[wrong].argsort(descending=True, stable=True)][:worst]
    written.append(
        save_figure(
            misclassified_figure(
                images[wrong],
                [result.classes[i] for i in result.labels[wrong].tolist()],
                [result.classes[i] for i in predicted[wrong].tolist()],
                confidence[wrong].tolist(),
                title=f"Most confidently misclassified ({len(wrong)} shown of "
                f"{int((predicted != result.labels).sum())} wrong, {split_name})",
            ),
            out / "misclassified.png",
        )
    )
    return written


def format_report(result: Evaluation, ckpt: Path) -> str:
    """The per-class table and headline numbers, as printed."""
    rows = [
        [name, result.per_class_count[i], int(result.confusion[i, i]), f"{result.per_class_acc[i]:.4f}"]
        for i, name in enumerate(result.classes)
    ]
    tta = " with flip TTA" if result.tta else ""
    lines = [
        f"{ckpt}: {result.split} split, {result.count} images{tta}",
        "",
        format_table(["class", "images", "correct", "accuracy"], rows),
        "",
        f"top-1 accuracy  {result.top1:.4f}",
        f"top-{result.top5_k} accuracy  {result.top5:.4f}",
        f"loss            {result.loss:.4f}",
        f"ECE ({CALIBRATION_BINS} bins)   {result.ece:.4f}",
    ]
    return "\n".join(lines)


def evaluate_checkpoint(
    ckpt_path: str | Path,
    data_dir: str | None = None,
    split: str = "test",
    tta: bool = False,
    out: str | Path | None = None,
    batch_size: int = 512,
    cache_dir: str | None = None,
    overwrite: bool = False,
) -> tuple[Evaluation, Path]:
    """Load, evaluate, write the report folder (``report.txt`` included); returns the evaluation and the folder."""
    ckpt = Path(ckpt_path)
    trained = load_trained_model(ckpt).to(auto_device())
    folder = Path(out) if out else default_out_dir(ckpt, split, tta)
    check_out_dir(folder, overwrite)
    chosen = load_eval_split(trained, data_dir, split, cache_dir)
    result = evaluate_split(trained, chosen, split, tta, max(1, batch_size))
    write_report(result, chosen.images, folder, sources=chosen.sources)
    (folder / "report.txt").write_text(format_report(result, ckpt) + "\n")
    return result, folder
