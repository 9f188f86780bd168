"""``scripts/fit.py``: resolve the options, build DataModule, LightningModule and Trainer, fit, test, report."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import sys
from collections.abc import Collection, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException

from cifar_resnet import environment
from cifar_resnet.cli.arguments import FitRequest, config_yaml, resolve, write_header
from cifar_resnet.cli.quiet import quiet_lightning
from cifar_resnet.config import DataConfig, FitConfig, TrainerConfig
from cifar_resnet.data.datamodule import CIFARDataModule, check_same_data
from cifar_resnet.data.sources import check_data_dir, resolve_dataset
from cifar_resnet.data.stats import describe_data
from cifar_resnet.errors import UserError
from cifar_resnet.training.loggers import check_logger_package
from cifar_resnet.training.module import ImageClassifier
from cifar_resnet.training.records import RECORD_NAME, RunClock, build_record, write_record
from cifar_resnet.training.reliability import StopSignals, TrainingInterruptedError, sigterm_stop
from cifar_resnet.training.resume import ResumePlan, plan_resume
from cifar_resnet.training.runs import RunLocation, claim_run_folder, read_checkpoint, run_location_of, run_lock
from cifar_resnet.training.step import GraphReplayError
from cifar_resnet.training.trainer import RunLabel, build_trainer, run_dir

DEFAULT_DATA_DIR = DataConfig().data_dir


def absolute_paths(config: FitConfig) -> FitConfig:
    """Paths as absolute ones, so a config or a checkpoint means the same from any working directory."""
    data = config.data
    data = replace(data, data_dir=str(Path(data.data_dir).expanduser().resolve()),
                   cache_dir=str(Path(data.cache_dir).expanduser().resolve()) if data.cache_dir else None)  # fmt: skip
    trainer = replace(config.trainer, log_dir=str(Path(config.trainer.log_dir).expanduser().resolve()))
    return replace(config, data=data, trainer=trainer)


def _has_record(checkpoint: Path, max_epochs: int) -> bool:
    """Whether the run folder of ``checkpoint`` holds the record of a run finished at ``max_epochs``."""
    location = run_location_of(checkpoint)
    record = location.path / RECORD_NAME if location is not None else None
    if record is None or not record.is_file():
        return False
    try:
        return json.loads(record.read_text()).get("epochs") == max_epochs
    except (OSError, ValueError):
        return False


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


RUN_FOLDER_ENV = "CIFAR_RESNET_RUN_FOLDER"  # the run folder rank 0 claimed, for processes Lightning launches


def launched_as_rank_zero() -> bool:
    """Whether this process is the first of its run (torchrun, SLURM and Lightning's launcher set these)."""
    for variable in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if variable in os.environ:
            return int(os.environ[variable]) == 0
    return True


def say(*parts: object, **kwargs: Any) -> None:
    """``print`` in the first process only: every process of a multi-process run goes through the same steps."""
    if launched_as_rank_zero():
        print(*parts, **kwargs)


def _run_folder(config: FitConfig, plan: ResumePlan, rank_zero: bool) -> tuple[RunLocation | None, bool]:
    """The run's folder and whether this call created it: a resumed run's own, else a newly claimed one."""
    if plan.checkpoint is not None and (location := run_location_of(plan.checkpoint)) is not None:
        return location, False
    if os.environ.get(RUN_FOLDER_ENV):
        folder = Path(os.environ[RUN_FOLDER_ENV])
        return RunLocation(folder.parent.parent, folder.parent.name, folder.name), False
    if not rank_zero or config.trainer.fast_dev_run:
        # The other processes' loggers write nothing, and checkpoints follow rank 0's folder; a --fast_dev_run
        # writes no log and no checkpoint at all, so it claims no folder.
        return None, False
    return claim_run_folder(config.trainer.log_dir, config.model.arch), True


def _branch_off(plan: ResumePlan) -> tuple[ResumePlan, set[Path]]:
    """Continue an older checkpoint of a run (an old best) as a new run beside it, leaving the run itself as it is.

    The checkpoint, and the best checkpoint it records, are copied into the new run's ``checkpoints/``, which the
    resumed run then owns: it never writes the original's ``last.ckpt`` or ``result.json``, nor deletes its best.
    """
    assert plan.checkpoint is not None and plan.newer is not None
    original = run_location_of(plan.checkpoint)
    assert original is not None
    if os.environ.get(RUN_FOLDER_ENV):  # a process launched by the first one: it already branched off
        folder = Path(os.environ[RUN_FOLDER_ENV])
        return replace(plan, checkpoint=folder / "checkpoints" / plan.checkpoint.name, newer=None), set()
    location = claim_run_folder(original.save_dir, original.name)
    target = location.path / "checkpoints"
    target.mkdir()
    copies = {target / plan.checkpoint.name}
    best = _recorded_best(plan.stored)
    if best is not None and best.parent == plan.checkpoint.parent and best.is_file():
        copies.add(target / best.name)
    for copy in copies:
        shutil.copy2(plan.checkpoint.parent / copy.name, copy)
    newest_step = int(read_checkpoint(plan.newer).get("global_step", 0))
    say(f"{plan.checkpoint} is an earlier state of its run (its last.ckpt is at step {newest_step}, this one at step "
        f"{plan.step}): continuing it as a new run in {location.path}; {original.path} is left as it is",
        flush=True)  # fmt: skip
    copied = target / plan.checkpoint.name
    config = replace(plan.config, run=replace(plan.config.run, ckpt_path=str(copied)))
    return replace(plan, config=config, checkpoint=copied, newer=None), copies


def _check_process_count(plan: ResumePlan, world_size: int, batch_size: int) -> None:
    """A run may continue on another number of processes (another global batch) only from an epoch's start.

    Inside an epoch the data order is planned for the process count the epoch began with: resumed on another
    count, some of its images would train twice and others not at all.
    """
    saved = int(plan.stored.get("world_size", world_size))
    if saved == world_size:
        return
    if plan.mid_epoch:
        raise UserError(
            f"{plan.checkpoint} was written inside an epoch by {saved} process{'es' if saved > 1 else ''}; continue "
            f"it on {saved} (--devices and --num_nodes as it ran) to the epoch's end, or from a checkpoint written "
            f"at an epoch's end, to change the number of processes"
        )
    say(f"continuing on {world_size} process{'es' if world_size > 1 else ''} (was {saved}): global batch "
        f"{world_size * batch_size} (was {saved * batch_size}) per step; the LR schedule is re-planned to end at "
        "the run's last step", flush=True)  # fmt: skip


def _recorded_best(checkpoint: dict[str, Any]) -> Path | None:
    """The best checkpoint's path that a checkpoint's ModelCheckpoint record holds, if any."""
    for key, state in checkpoint.get("callbacks", {}).items():
        if key.startswith("ModelCheckpoint") and isinstance(state, dict) and state.get("monitor") == "val/acc":
            path = state.get("best_model_path")
            return Path(path) if path else None
    return None


def _fit(config: FitConfig, explicit: Collection[str], command: list[str]) -> dict[str, Any]:
    may_download = config.data.download or config.data.data_dir == DEFAULT_DATA_DIR
    config = absolute_paths(config)
    log_dir = Path(config.trainer.log_dir)
    if log_dir.exists() and not log_dir.is_dir():
        raise UserError(f"--log_dir {log_dir} is a file; pass a folder (runs land in LOG_DIR/<arch>/version_N)")
    plan = plan_resume(config, explicit)
    branch: set[Path] = set()  # the files a branched-off run copied into its new folder
    if plan.newer is not None:
        plan, branch = _branch_off(plan)
    config = plan.config
    max_epochs = config.trainer.max_epochs
    if plan.checkpoint is not None:
        changed = f"; changed: {', '.join(plan.notes)}" if plan.notes else ""
        say(f"resuming {plan.checkpoint} (epoch {plan.epochs_done} of {max_epochs} done, step {plan.step})"
              f"{changed}", flush=True)  # fmt: skip
        plan.check_length(max_epochs)
        if plan.epochs_done >= max_epochs:
            if _has_record(plan.checkpoint, max_epochs):
                epochs = f"{plan.epochs_done} epoch{'s' if plan.epochs_done != 1 else ''}"
                say(f"the run is finished: {epochs} trained of --max_epochs {max_epochs}; nothing to do (raise "
                      "--max_epochs to train longer)", flush=True)  # fmt: skip
                return {"finished_already": True}
            # Training is complete but a stop cut the final test (or the record) short: do them now.
            say("training is complete; running the final test and writing the record", flush=True)
    else:
        for note in plan.notes:
            say(note, flush=True)
    check_logger_package(config.trainer.logger)  # before anything is written
    check_data_dir(config.data.data_dir, may_download=may_download, dataset=config.data.dataset)
    # The run records the data set it trains on, not "auto": a resume reads the same source however the folder
    # looks by then, and config.yaml says what was trained.
    dataset = resolve_dataset(config.data.dataset, config.data.data_dir)
    config = replace(config, data=replace(config.data, dataset=dataset))
    L.seed_everything(config.data.seed, workers=True, verbose=False)
    datamodule = CIFARDataModule(config.data)
    if config.run.describe_data:
        say(describe_data(datamodule), flush=True)
        return {"described_data": True}
    num_classes = datamodule.num_classes
    if plan.checkpoint is not None and config.model.num_classes != num_classes:
        raise UserError(
            f"--ckpt_path {plan.checkpoint} has {config.model.num_classes} classes but {config.data.data_dir} has "
            f"{num_classes}; pass the run's --data_dir, or start a new run"
        )
    if plan.checkpoint is not None:
        # Refuse other data before the trainer starts writing into the run's folder.
        datamodule.prepare_data()
        datamodule.setup("fit")
        stored_data = plan.stored.get(type(datamodule).__qualname__, {})
        check_same_data(stored_data, list(datamodule.classes), datamodule.fingerprint, str(datamodule.data_dir))
    config = replace(config, model=replace(config.model, num_classes=num_classes))
    model = ImageClassifier(config.model)
    rank_zero = launched_as_rank_zero()
    new_parents = [p for p in (log_dir / config.model.arch, log_dir) if not p.exists()]  # deepest first
    location, created = _run_folder(config, plan, rank_zero)
    created = created or bool(branch)
    try:
        with StopSignals() as signals, contextlib.ExitStack() as stack:
            if rank_zero and location is not None:
                stolen = stack.enter_context(run_lock(location.path))
                if stolen:
                    print(stolen, flush=True)
                # Processes Lightning launches for DDP inherit the environment: they write to the same folder.
                stack.enter_context(_environment_variable(RUN_FOLDER_ENV, str(location.path)))
            return _train_and_test(config, datamodule, model, plan, location, signals, command)
    except (UserError, TrainingInterruptedError):
        # Bad input or data, or a signal before the first step: a folder this call created holds nothing to keep.
        folder = location.path if location is not None else None
        if created and folder is not None and folder.is_dir() and set(folder.rglob("*.ckpt")) <= branch:
            shutil.rmtree(folder, ignore_errors=True)
            for parent in new_parents:  # and the folders the claim created for it, when nothing else is there
                with contextlib.suppress(OSError):
                    parent.rmdir()
        raise


@contextlib.contextmanager
def _environment_variable(name: str, value: str) -> Iterator[None]:
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous


def _train_and_test(
    config: FitConfig,
    datamodule: CIFARDataModule,
    model: ImageClassifier,
    plan: ResumePlan,
    location: RunLocation | None,
    signals: StopSignals,
    command: list[str],
) -> dict[str, Any]:
    """Fit (stopping cleanly on signals), then test the best checkpoint once."""

    def render(trainer: L.Trainer) -> str:
        header = write_header(command, environment.describe(trainer.strategy.root_device))
        return config_yaml(_resolved_config(config, trainer), header)

    stored = replace(config, run=replace(config.run, ckpt_path=None)).flat()
    label = RunLabel(config.model.arch, location, render, stored, signals)
    trainer, checkpoints = build_trainer(config.trainer, label)
    if plan.checkpoint is not None:
        _check_process_count(plan, trainer.world_size, config.data.batch_size)
    ckpt_path = str(plan.checkpoint) if plan.checkpoint else None
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    except SIGTERMException as stop:  # outside a training batch; the checkpoint is written on the way out
        done = trainer.fit_loop.epoch_progress.current.completed >= (trainer.max_epochs or 0)
        raise sigterm_stop(trainer, "after training, before the final test" if done else "during training") from stop
    except (TrainingInterruptedError, GraphReplayError) as stop:
        if stop.checkpoint is None:  # stopped without a new checkpoint: continue from the run's newest one
            kept = location.path / "checkpoints" / "last.ckpt" if location is not None else None
            stop.checkpoint = kept if kept is not None and kept.is_file() else plan.checkpoint
        raise
    last = Path(checkpoints.last.best_model_path) if checkpoints.last.best_model_path else None
    signals.phase_done("after training, before the final test", last)  # a signal in the last validation

    result: dict[str, Any] = {"run_dir": str(run_dir(trainer)) if run_dir(trainer) else None}
    result["step"] = model.step_mode  # how the step ran: graphed, or eager and why (for result.json)
    # The run's own logger and folders: a resumed run takes them from its checkpoint, not from the command line.
    result["curves"] = curves_hint(config.trainer, result["run_dir"])
    if config.trainer.fast_dev_run:
        return result
    best_path, best_score = checkpoints.best.best_model_path, checkpoints.best.best_model_score
    result["best_val_acc"] = float(best_score) if best_score is not None else None
    result["best_epoch"] = _best_epoch(best_path) if best_path else None
    result["best_checkpoint"] = best_path or None
    result["last_checkpoint"] = checkpoints.last.best_model_path or None
    if config.run.test and datamodule.has_test_split:
        signals.phase = "during the final test"
        try:
            tested = trainer.test(model, datamodule=datamodule, ckpt_path=best_path or None, verbose=False)
        except SIGTERMException as stop:
            raise TrainingInterruptedError(signal.SIGTERM, last, "during the final test") from stop
        except TrainingInterruptedError as stop:
            stop.checkpoint = last
            raise
        signals.phase_done("during the final test", last)
        result["test_acc"] = float(tested[0]["test/acc"]) if tested else None
        result["test_selected_on_test"] = config.data.val_size == 0
    if trainer.is_global_zero and location is not None:
        result["record"] = str(_write_record(config, trainer, datamodule, result, command, location.path))
    return result


def _write_record(
    config: FitConfig,
    trainer: L.Trainer,
    datamodule: CIFARDataModule,
    result: dict[str, Any],
    command: list[str],
    folder: Path,
) -> Path:
    """The run's ``result.json``: what a results table needs, and the command that reproduces it."""
    clock = next(callback for callback in trainer.callbacks if isinstance(callback, RunClock))
    device = environment.device_name(trainer.strategy.root_device)
    if trainer.world_size > 1:
        device = f"{trainer.world_size} x {device}"
    data = {"dir": str(datamodule.data_dir), "fingerprint": datamodule.fingerprint, "classes": len(datamodule.classes)}
    options = _resolved_config(config, trainer).flat()
    return write_record(folder, build_record(options, result, clock.seconds(), device, command, data))


def _report(result: dict[str, Any], config: FitConfig) -> None:
    lines = ["", "Run finished."]
    if result.get("best_val_acc") is not None:
        lines.append(f"  best val acc    {result['best_val_acc']:.4f} (epoch {result.get('best_epoch')})")
    if "test_acc" in result:
        note = "  (selected on this same split: --val_size 0)" if result.get("test_selected_on_test") else ""
        lines.append(f"  test acc        {result['test_acc']:.4f}{note}")
    elif not config.run.test:
        lines.append("  test acc        not measured (--no_test)")
    elif not config.trainer.fast_dev_run:
        lines.append("  test acc        not measured (no test split; add DATA_DIR/test/<class>/*)")
    if config.trainer.limit_val_batches == 0:
        lines.append(
            "  validation      none (--limit_val_batches 0): no best checkpoint; the test used the last weights"
        )
    if result.get("best_checkpoint"):
        lines.append(f"  best checkpoint {result['best_checkpoint']}")
    if result.get("last_checkpoint"):
        lines.append(f"  resume with     {resume_command(result['last_checkpoint'])}")
    if result.get("run_dir"):
        lines.append(f"  run folder      {result['run_dir']}")
    if not config.trainer.fast_dev_run:  # a dry run logs nothing
        lines.append(f"  curves          {result.get('curves') or curves_hint(config.trainer, result.get('run_dir'))}")
    say("\n".join(lines), flush=True)


def curves_hint(config: TrainerConfig, run: str | None) -> str:
    """Where to look at the run's curves with its ``--logger``."""
    if config.logger == "csv":
        return f"python scripts/plot.py {run or config.log_dir} (from metrics.csv)"
    if config.logger == "mlflow":
        local = (Path(run) / "mlruns").resolve().as_uri() if run else "file:RUN/mlruns"
        uri = config.mlflow_tracking_uri or local
        return f"mlflow ui --backend-store-uri {uri}"
    if config.logger == "wandb":
        return f"the W&B project {config.wandb_project} (offline runs: wandb sync {run or 'RUN'}/wandb/offline-run-*)"
    return f"tensorboard --logdir {config.log_dir}"


def resume_command(checkpoint: str | Path) -> str:
    """The command that continues a run from ``checkpoint``: the checkpoint carries every other option."""
    return f"python scripts/fit.py --ckpt_path {Path(checkpoint).resolve()}"


def interruption_message(stop: TrainingInterruptedError) -> str:
    """One line: what stopped the run, what was kept, and how to go on."""
    if stop.checkpoint is None:
        return f"{stop}; nothing was trained, nothing to resume"
    if stop.phase.startswith("after training") or stop.phase == "during the final test":
        return (
            f"{stop}; training is complete ({stop.checkpoint}); run the final test and write the run's record with: "
            f"{resume_command(stop.checkpoint)}"
        )
    if not stop.written:  # the stop wrote nothing: the run's newest file is older, and complete (atomic writes)
        return (
            f"{stop}; no checkpoint written now, the latest complete one is {stop.checkpoint}; resume with: "
            f"{resume_command(stop.checkpoint)}"
        )
    return f"{stop}, checkpoint written; resume with: {resume_command(stop.checkpoint)}"


def replay_failure_message(failure: GraphReplayError) -> str:
    """One line: the failed replay, and the resume command (a new process captures the graph again)."""
    if failure.checkpoint is None:
        return f"{failure}; no checkpoint was written yet: run the command again (--no_cuda_graphs trains eagerly)"
    return (
        f"{failure}; the GPU state is lost, so the run stops; resume with: {resume_command(failure.checkpoint)} "
        "(it captures the graph again; add --no_cuda_graphs to train eagerly)"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``scripts/fit.py``; user mistakes end as one line on stderr and exit status 2."""
    command = ["python", "scripts/fit.py", *(sys.argv[1:] if argv is None else argv)]
    try:
        request: FitRequest = resolve(argv)
        if request.print_config:
            print(config_yaml(request.config), end="")
            return 0
        result = run_fit(request.config, request.explicit | set(request.from_file), command)
    except UserError as err:
        say(f"fit.py: error: {err}", file=sys.stderr)
        return 2
    except TrainingInterruptedError as stop:
        say(f"fit.py: {interruption_message(stop)}", file=sys.stderr, flush=True)
        return stop.exit_code
    except KeyboardInterrupt:  # Ctrl-C before the run's own signal handlers are installed
        say("fit.py: stopped by SIGINT before training; no checkpoint written", file=sys.stderr, flush=True)
        return 128 + signal.SIGINT
    except GraphReplayError as failure:  # a GPU fault, not a user mistake: exit 1
        say(f"fit.py: error: {replay_failure_message(failure)}", file=sys.stderr, flush=True)
        return 1
    if not result.get("finished_already") and not result.get("described_data"):
        _report(result, request.config)
    return 0


__all__ = ["DEFAULT_DATA_DIR", "TrainerConfig", "main", "run_fit"]
