"""``scripts/fit.py``: parse arguments, build DataModule, LightningModule and Trainer, fit, test, report."""

from __future__ import annotations

import argparse
import re
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException

from cifar_resnet.cli.common import OneLineErrorParser
from cifar_resnet.data import CIFARDataModule
from cifar_resnet.data.sources import check_data_dir
from cifar_resnet.data.stats import describe_data
from cifar_resnet.errors import UserError
from cifar_resnet.models import list_models
from cifar_resnet.training.module import ImageClassifier
from cifar_resnet.training.reliability import TrainingInterruptedError, sigterm_stop
from cifar_resnet.training.runs import (
    checkpoint_hparams,
    completed_epochs,
    find_last_checkpoint,
    read_checkpoint,
    run_location_of,
)
from cifar_resnet.training.trainer import TrainerSettings, build_trainer, run_dir


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def _positive_int_or_auto(text: str) -> int | None:
    """A positive integer, or ``auto`` (None)."""
    if text == "auto":
        return None
    try:
        return _positive_int(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"must be a positive integer or auto, got {text}") from err


def _fraction_or_count(text: str) -> float | int:
    """Lightning's limit_*_batches: a float fraction in (0, 1] or an integer count of batches."""
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive fraction or count, got {text}")
    return int(value) if value > 1 or ("." not in text and "e" not in text.lower()) else value


DEFAULT_DATA_DIR = "./data"


def build_parser() -> argparse.ArgumentParser:
    """Every flag of ``scripts/fit.py`` with its default."""
    p = OneLineErrorParser(
        prog="fit.py",
        description="Train a ResNet on CIFAR-10 with PyTorch Lightning.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    model = p.add_argument_group("model and optimisation")
    model.add_argument(
        "--arch",
        default="resnet18",
        choices=list_models(),
        metavar="ARCH",
        help=f"architecture: {', '.join(list_models())}",
    )
    model.add_argument("--max_epochs", type=_positive_int, default=200, help="epochs to train")
    model.add_argument("--batch_size", type=_positive_int, default=128, help="training batch size per process")
    model.add_argument("--eval_batch_size", type=_positive_int, default=1024, help="validation/test batch size")
    model.add_argument("--lr", type=_positive_float, default=0.1, help="peak learning rate (SGD)")
    model.add_argument("--momentum", type=_non_negative_float, default=0.9, help="SGD momentum")
    model.add_argument("--weight_decay", type=_non_negative_float, default=5e-4, help="L2 weight decay")
    model.add_argument("--nesterov", action="store_true", help="Nesterov momentum")
    model.add_argument(
        "--no_bn_bias_decay", action="store_true", help="exempt norm-layer weights and biases from weight decay"
    )
    model.add_argument("--label_smoothing", type=_non_negative_float, default=0.0, help="cross-entropy smoothing")
    model.add_argument(
        "--warmup_epochs", type=_non_negative_float, default=0.0, help="linear LR warm-up before the cosine decay"
    )
    model.add_argument("--zero_init_residual", action="store_true", help="zero the last BN of each residual branch")

    data = p.add_argument_group("data")
    data.add_argument(
        "--data_dir",
        default=DEFAULT_DATA_DIR,
        help="DIR/train/<class>/*.png|jpg (optional DIR/test/...) or torchvision's CIFAR-10 in DIR",
    )
    data.add_argument(
        "--val_size",
        type=_non_negative_int,
        default=5000,
        help="training images held out for validation (stratified); 0 validates on the test split",
    )
    data.add_argument(
        "--num_workers",
        type=_non_negative_int,
        default=0,
        help="DataLoader worker processes (batches come from memory; 0 is usually fastest)",
    )
    data.add_argument(
        "--cache_dir", default=None, help="where decoded image folders are cached (default ~/.cache/cifar_resnet)"
    )
    data.add_argument("--crop_padding", type=_non_negative_int, default=4, help="random-crop padding; 0 is off")
    data.add_argument("--hflip", action=argparse.BooleanOptionalAction, default=True, help="random horizontal flip")
    data.add_argument(
        "--color_jitter",
        type=_non_negative_float,
        nargs=4,
        default=None,
        metavar=("B", "C", "S", "H"),
        help="colour jitter strengths: brightness contrast saturation hue",
    )
    data.add_argument(
        "--random_resized_crop",
        action="store_true",
        help="random resized crop (scale 0.1-1, ratio 0.5-2) before the padded crop",
    )
    data.add_argument("--cutout", type=_non_negative_int, default=0, help="cutout square side in pixels; 0 is off")

    run = p.add_argument_group("trainer")
    run.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "32-true", "16-mixed", "bf16-mixed", "bf16-true", "64-true"],
        help="auto: bf16-mixed on GPUs with bf16, 16-mixed on older GPUs, 32-true on the CPU",
    )
    run.add_argument("--accelerator", default="auto", choices=["auto", "cpu", "gpu", "cuda", "mps"], help="device type")
    run.add_argument("--devices", default="auto", help="device count, comma list of ids, or auto")
    run.add_argument("--strategy", default="auto", help="Lightning strategy, e.g. ddp")
    run.add_argument("--seed", type=int, default=0, help="seeds weights, split, data order and augmentation")
    run.add_argument("--deterministic", action="store_true", help="deterministic algorithms (slower on GPU)")
    run.add_argument(
        "--ckpt_path", default=None, help="resume: a checkpoint path, or 'last' for the newest last.ckpt of --arch"
    )
    run.add_argument("--log_dir", default="lightning_logs", help="runs land in LOG_DIR/<arch>/version_N")
    run.add_argument(
        "--limit_train_batches",
        type=_fraction_or_count,
        default=None,
        help="train on this fraction (<=1.0) or number of batches per epoch",
    )
    run.add_argument(
        "--limit_val_batches",
        type=_fraction_or_count,
        default=None,
        help="validate on this fraction (<=1.0) or number of batches",
    )
    run.add_argument("--fast_dev_run", action="store_true", help="one batch of train/val/test, nothing saved")
    speed = p.add_argument_group("speed")
    speed.add_argument(
        "--channels_last",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="NHWC memory format for convolutions (measured faster on CUDA and on the CPU)",
    )
    speed.add_argument("--compile", action="store_true", help="torch.compile the network (slow start, faster steps)")
    speed.add_argument(
        "--cuda_graphs",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="replay each training step as one CUDA graph (one process on a GPU, any precision but 16-mixed)",
    )
    speed.add_argument(
        "--data_on_device",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="keep the uint8 dataset on the GPU and index batches there (CUDA only)",
    )
    run.add_argument(
        "--progress",
        default="auto",
        choices=["auto", "bar", "lines", "none"],
        help="auto: a bar on a terminal, plain lines otherwise",
    )
    run.add_argument(
        "--log_every_n_steps",
        type=_positive_int,
        default=50,
        help="write step-level scalars (loss, lr) every N optimizer steps",
    )
    run.add_argument("--no_test", action="store_true", help="skip the final test-split evaluation")
    run.add_argument(
        "--confusion_every_n_epochs",
        type=_positive_int_or_auto,
        default="auto",
        metavar="N|auto",
        help="draw the validation confusion matrix in TensorBoard every N epochs and after the last; "
        "auto (default): as often as costs at most 2%% of the run's time (every epoch on a CPU)",
    )
    run.add_argument(
        "--describe_data",
        action="store_true",
        help="print per-class counts of each split and the training split's mean/std, then exit",
    )
    run.add_argument(
        "--ckpt_every_n_steps",
        type=_positive_int,
        default=None,
        help="also rewrite last.ckpt every N optimizer steps, so a kill mid-epoch loses at most N steps",
    )
    run.add_argument(
        "--max_nonfinite_steps",
        type=_positive_int,
        default=3,
        help="stop after this many consecutive NaN/inf training losses",
    )
    return p


def _resolve_resume(args: argparse.Namespace) -> tuple[Path | None, dict[str, Any]]:
    """The checkpoint to resume from (``last`` resolved) and its stored hyperparameters; checks the arch.

    ``hparams["_epochs_done"]`` is the number of epochs the checkpoint has fully trained.
    """
    if args.ckpt_path is None:
        return None, {}
    path = find_last_checkpoint(args.log_dir, args.arch) if args.ckpt_path == "last" else Path(args.ckpt_path)
    checkpoint = read_checkpoint(path)
    hparams = checkpoint_hparams(checkpoint)
    hparams["_epochs_done"] = completed_epochs(checkpoint)
    stored_arch = hparams.get("arch")
    if stored_arch is not None and stored_arch != args.arch:
        raise UserError(
            f"--ckpt_path {path} was trained with --arch {stored_arch}, not {args.arch}; "
            f"pass --arch {stored_arch} to resume it"
        )
    return path, hparams


def _best_epoch(best_path: str) -> int | None:
    match = re.search(r"best-epoch(\d+)", Path(best_path).name)
    return int(match.group(1)) if match else None


def run_fit(args: argparse.Namespace) -> dict[str, Any]:
    """Train, select the best checkpoint on validation, test it once, and return the headline numbers."""
    ckpt_path, stored = _resolve_resume(args)
    if ckpt_path is not None and stored["_epochs_done"] >= args.max_epochs:
        print(
            f"{ckpt_path} has already trained {stored['_epochs_done']} epochs (--max_epochs {args.max_epochs}): "
            "the run is finished, nothing to do; raise --max_epochs to train longer",
            flush=True,
        )
        return {"finished_already": True}
    check_data_dir(args.data_dir, may_download=args.data_dir == DEFAULT_DATA_DIR)
    L.seed_everything(args.seed, workers=True, verbose=False)
    datamodule = CIFARDataModule(
        data_dir=args.data_dir,
        batch_size=args.batch_size,
        eval_batch_size=args.eval_batch_size,
        val_size=args.val_size,
        num_workers=args.num_workers,
        data_seed=args.seed,
        crop_padding=args.crop_padding,
        hflip=args.hflip,
        color_jitter=args.color_jitter,
        random_resized_crop=args.random_resized_crop,
        cutout=args.cutout,
        cache_dir=args.cache_dir,
        data_on_device=args.data_on_device,
    )
    if args.describe_data:
        print(describe_data(datamodule), flush=True)
        return {"described_data": True}
    num_classes = datamodule.num_classes
    if stored and stored.get("num_classes", num_classes) != num_classes:
        raise UserError(
            f"--ckpt_path {ckpt_path} has {stored['num_classes']} classes but {args.data_dir} has {num_classes}"
        )
    model = ImageClassifier(
        arch=args.arch,
        num_classes=num_classes,
        lr=args.lr,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        nesterov=args.nesterov,
        label_smoothing=args.label_smoothing,
        warmup_epochs=args.warmup_epochs,
        no_bn_bias_decay=args.no_bn_bias_decay,
        zero_init_residual=args.zero_init_residual,
        channels_last=args.channels_last,
        compile_model=args.compile,
        cuda_graphs=args.cuda_graphs,
    )
    settings = TrainerSettings(
        arch=args.arch,
        max_epochs=args.max_epochs,
        log_dir=args.log_dir,
        accelerator=args.accelerator,
        devices=args.devices,
        strategy=args.strategy,
        precision=args.precision,
        deterministic=args.deterministic,
        limit_train_batches=args.limit_train_batches,
        limit_val_batches=args.limit_val_batches,
        fast_dev_run=args.fast_dev_run,
        progress=args.progress,
        log_every_n_steps=args.log_every_n_steps,
        confusion_every_n_epochs=args.confusion_every_n_epochs,
        ckpt_every_n_steps=args.ckpt_every_n_steps,
        max_nonfinite_steps=args.max_nonfinite_steps,
        resume_location=run_location_of(ckpt_path) if ckpt_path else None,
        run_arguments={**vars(args), "ckpt_path": str(ckpt_path) if ckpt_path else None},
    )
    trainer, checkpoints = build_trainer(settings)
    folder = run_dir(trainer)
    folder_is_new = folder is not None and not folder.exists()
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=str(ckpt_path) if ckpt_path else None)
    except SIGTERMException as stop:  # outside a training batch; the checkpoint is written on the way out
        raise sigterm_stop(trainer) from stop
    except UserError:
        # Bad data is found when the Trainer decodes it; a run folder this call created holds nothing yet.
        if folder_is_new and trainer.is_global_zero and folder.is_dir() and not any(folder.rglob("*.ckpt")):
            shutil.rmtree(folder, ignore_errors=True)
        raise

    result: dict[str, Any] = {"run_dir": str(run_dir(trainer)) if run_dir(trainer) else None}
    if args.fast_dev_run:
        return result
    best_path, best_score = checkpoints.best.best_model_path, checkpoints.best.best_model_score
    result["best_val_acc"] = float(best_score) if best_score is not None else None
    result["best_epoch"] = _best_epoch(best_path) if best_path else None
    result["best_checkpoint"] = best_path or None
    result["last_checkpoint"] = checkpoints.last.best_model_path or None
    if not args.no_test and datamodule.has_test_split:
        tested = trainer.test(model, datamodule=datamodule, ckpt_path=best_path or None, verbose=False)
        result["test_acc"] = float(tested[0]["test/acc"]) if tested else None
        result["test_selected_on_test"] = args.val_size == 0
    return result


def _report(result: dict[str, Any], args: argparse.Namespace) -> None:
    lines = ["", "Run finished."]
    if result.get("best_val_acc") is not None:
        lines.append(f"  best val acc   {result['best_val_acc']:.4f} (epoch {result.get('best_epoch')})")
    if "test_acc" in result:
        note = "  (selected on this same split: --val_size 0)" if result.get("test_selected_on_test") else ""
        lines.append(f"  test acc       {result['test_acc']:.4f}{note}")
    elif not args.fast_dev_run:
        lines.append("  test acc       not measured (no test split; add DATA_DIR/test/<class>/*)")
    if result.get("best_checkpoint"):
        lines.append(f"  best checkpoint {result['best_checkpoint']}")
    if result.get("last_checkpoint"):
        lines.append(
            f"  resume with    python scripts/fit.py --arch {args.arch} --ckpt_path {result['last_checkpoint']}"
        )
    if result.get("run_dir"):
        lines.append(f"  run folder     {result['run_dir']}")
    lines.append(f"  curves         tensorboard --logdir {args.log_dir}")
    print("\n".join(lines), flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``scripts/fit.py``; user mistakes end as one line on stderr and exit status 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = run_fit(args)
        if result.get("finished_already"):
            return 0
    except UserError as err:
        print(f"fit.py: error: {err}", file=sys.stderr)
        return 2
    except TrainingInterruptedError as stop:
        where = f"; resume with: python scripts/fit.py --arch {args.arch} --ckpt_path {stop.checkpoint}"
        print(f"fit.py: {stop}, checkpoint written{where}", file=sys.stderr, flush=True)
        return stop.exit_code
    if not result.get("described_data"):
        _report(result, args)
    return 0
