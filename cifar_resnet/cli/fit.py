"""``scripts/fit.py``: resolve the options, build DataModule, LightningModule and Trainer, fit, test, report."""

from __future__ import annotations

import re
import shutil
import sys
from collections.abc import Collection, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException

from cifar_resnet import environment
from cifar_resnet.cli.arguments import FitRequest, config_yaml, resolve, write_header
from cifar_resnet.cli.quiet import quiet_lightning
from cifar_resnet.config import DataConfig, FitConfig, TrainerConfig
from cifar_resnet.data.datamodule import CIFARDataModule
from cifar_resnet.data.sources import check_data_dir
from cifar_resnet.data.stats import describe_data
from cifar_resnet.errors import UserError
from cifar_resnet.training.module import ImageClassifier
from cifar_resnet.training.reliability import TrainingInterruptedError, sigterm_stop
from cifar_resnet.training.runs import (
    checkpoint_hparams,
    completed_epochs,
    find_last_checkpoint,
    read_checkpoint,
    run_location_of,
)
from cifar_resnet.training.trainer import RunLabel, build_trainer, run_dir

DEFAULT_DATA_DIR = DataConfig().data_dir


def absolute_paths(config: FitConfig) -> FitConfig:
    """Paths as absolute ones, so a config or a checkpoint means the same from any working directory."""
    data = config.data
    data = replace(data, data_dir=str(Path(data.data_dir).expanduser().resolve()),
                   cache_dir=str(Path(data.cache_dir).expanduser().resolve()) if data.cache_dir else None)  # fmt: skip
    trainer = replace(config.trainer, log_dir=str(Path(config.trainer.log_dir).expanduser().resolve()))
    return replace(config, data=data, trainer=trainer)


def _resolve_resume(config: FitConfig) -> tuple[Path | None, dict[str, Any]]:
    """The checkpoint to resume from (``last`` resolved) and its stored hyperparameters; checks the arch.

    ``hparams["_epochs_done"]`` is the number of epochs the checkpoint has fully trained.
    """
    if config.run.ckpt_path is None:
        return None, {}
    arch = config.model.arch
    path = (
        find_last_checkpoint(config.trainer.log_dir, arch)
        if config.run.ckpt_path == "last"
        else Path(config.run.ckpt_path)
    )
    checkpoint = read_checkpoint(path)
    hparams = checkpoint_hparams(checkpoint)
    hparams["_epochs_done"] = completed_epochs(checkpoint)
    stored_arch = hparams.get("arch")
    if stored_arch is not None and stored_arch != arch:
        raise UserError(
            f"--ckpt_path {path} was trained with --arch {stored_arch}, not {arch}; pass --arch {stored_arch} to "
            "resume it"
        )
    return path, hparams


def _best_epoch(best_path: str) -> int | None:
    match = re.search(r"best-epoch(\d+)", Path(best_path).name)
    return int(match.group(1)) if match else None


def _resolved_config(config: FitConfig, trainer: L.Trainer) -> FitConfig:
    """The config as this trainer runs it: precision, accelerator and devices resolved; no resume path."""
    devices: Any = trainer.device_ids if trainer.num_devices > 1 else trainer.num_devices
    accelerator = trainer.strategy.root_device.type
    resolved = replace(config.trainer, precision=str(trainer.precision), accelerator=accelerator, devices=devices)
    return replace(config, trainer=resolved, run=replace(config.run, ckpt_path=None))


def run_fit(config: FitConfig, explicit: Collection[str] = (), command: Sequence[str] | None = None) -> dict[str, Any]:
    """Train, select the best checkpoint on validation, test it once, and return the headline numbers."""
    with quiet_lightning():
        return _fit(config, explicit, list(command) if command is not None else ["fit.py"])


def _fit(config: FitConfig, explicit: Collection[str], command: list[str]) -> dict[str, Any]:
    may_download = config.data.data_dir == DEFAULT_DATA_DIR
    config = absolute_paths(config)
    ckpt_path, stored = _resolve_resume(config)
    max_epochs = config.trainer.max_epochs
    if ckpt_path is not None and stored["_epochs_done"] >= max_epochs:
        print(
            f"{ckpt_path} has already trained {stored['_epochs_done']} epochs (--max_epochs {max_epochs}): "
            "the run is finished, nothing to do; raise --max_epochs to train longer",
            flush=True,
        )
        return {"finished_already": True}
    check_data_dir(config.data.data_dir, may_download=may_download)
    L.seed_everything(config.data.seed, workers=True, verbose=False)
    datamodule = CIFARDataModule(config.data)
    if config.run.describe_data:
        print(describe_data(datamodule), flush=True)
        return {"described_data": True}
    num_classes = datamodule.num_classes
    if stored and stored.get("num_classes", num_classes) != num_classes:
        raise UserError(
            f"--ckpt_path {ckpt_path} has {stored['num_classes']} classes but {config.data.data_dir} has {num_classes}"
        )
    config = replace(config, model=replace(config.model, num_classes=num_classes))
    model = ImageClassifier(config.model)

    def render(trainer: L.Trainer) -> str:
        header = write_header(command, environment.describe(trainer.strategy.root_device))
        return config_yaml(_resolved_config(config, trainer), header)

    label = RunLabel(config.model.arch, run_location_of(ckpt_path) if ckpt_path else None, render)
    trainer, checkpoints = build_trainer(config.trainer, label)
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
    if config.trainer.fast_dev_run:
        return result
    best_path, best_score = checkpoints.best.best_model_path, checkpoints.best.best_model_score
    result["best_val_acc"] = float(best_score) if best_score is not None else None
    result["best_epoch"] = _best_epoch(best_path) if best_path else None
    result["best_checkpoint"] = best_path or None
    result["last_checkpoint"] = checkpoints.last.best_model_path or None
    if config.run.test and datamodule.has_test_split:
        tested = trainer.test(model, datamodule=datamodule, ckpt_path=best_path or None, verbose=False)
        result["test_acc"] = float(tested[0]["test/acc"]) if tested else None
        result["test_selected_on_test"] = config.data.val_size == 0
    return result


def _report(result: dict[str, Any], config: FitConfig) -> None:
    lines = ["", "Run finished."]
    if result.get("best_val_acc") is not None:
        lines.append(f"  best val acc    {result['best_val_acc']:.4f} (epoch {result.get('best_epoch')})")
    if "test_acc" in result:
        note = "  (selected on this same split: --val_size 0)" if result.get("test_selected_on_test") else ""
        lines.append(f"  test acc        {result['test_acc']:.4f}{note}")
    elif not config.trainer.fast_dev_run:
        lines.append("  test acc        not measured (no test split; add DATA_DIR/test/<class>/*)")
    if result.get("best_checkpoint"):
        lines.append(f"  best checkpoint {result['best_checkpoint']}")
    if result.get("last_checkpoint"):
        lines.append(f"  resume with     {resume_command(config, result['last_checkpoint'])}")
    if result.get("run_dir"):
        lines.append(f"  run folder      {result['run_dir']}")
    lines.append(f"  curves          tensorboard --logdir {config.trainer.log_dir}")
    print("\n".join(lines), flush=True)


def resume_command(config: FitConfig, checkpoint: str | Path) -> str:
    """The command that continues a run from ``checkpoint``."""
    return f"python scripts/fit.py --arch {config.model.arch} --ckpt_path {checkpoint}"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``scripts/fit.py``; user mistakes end as one line on stderr and exit status 2."""
    command = ["python", "scripts/fit.py", *(sys.argv[1:] if argv is None else argv)]
    try:
        request: FitRequest = resolve(argv)
        if request.print_config:
            print(config_yaml(request.config), end="")
            return 0
        result = run_fit(request.config, request.explicit, command)
    except UserError as err:
        print(f"fit.py: error: {err}", file=sys.stderr)
        return 2
    except TrainingInterruptedError as stop:
        print(f"fit.py: {stop}, checkpoint written; resume with: {resume_command(request.config, stop.checkpoint)}",
              file=sys.stderr, flush=True)  # fmt: skip
        return stop.exit_code
    if not result.get("finished_already") and not result.get("described_data"):
        _report(result, request.config)
    return 0


__all__ = ["DEFAULT_DATA_DIR", "TrainerConfig", "main", "run_fit"]
