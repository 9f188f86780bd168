"""Continuing a run: its checkpoint carries the run's config, and only options that cannot change what it
learns may be given differently."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from cifar_resnet.config import DataConfig, FitConfig, ModelConfig, as_dict, option_spec, upgrade_names
from cifar_resnet.errors import UserError
from cifar_resnet.training.lightning_compat import completed_epochs, epoch_in_progress
from cifar_resnet.training.runs import find_last_checkpoint, newest_last_checkpoint, read_checkpoint, run_location_of

RUN_CONFIG_KEY = "run_config"  # where a checkpoint keeps the flat config of its run
LAST_NAME = "last.ckpt"


@dataclass
class ResumePlan:
    """What a fit starts from: the config to run, the checkpoint to continue (None: a new run), and notes."""

    config: FitConfig
    checkpoint: Path | None = None
    epochs_done: int = 0
    step: int = 0
    notes: list[str] = field(default_factory=list)
    stored: dict[str, Any] = field(default_factory=dict)  # the checkpoint itself, for identity checks
    newer: Path | None = None  # the run's last.ckpt, when it holds a later state than ``checkpoint``

    @property
    def mid_epoch(self) -> bool:
        """Whether the checkpoint was written inside an epoch (its training or validation not finished)."""
        return epoch_in_progress(self.stored)

    def position(self) -> str:
        """Where the run stands, as the progress lines count epochs (from 1)."""
        if self.mid_epoch:
            return f"inside epoch {self.epochs_done + 1} (step {self.step})"
        return f"after epoch {self.epochs_done} (step {self.step})"

    def check_length(self, max_epochs: int) -> None:
        """Refuse a ``--max_epochs`` that ends before the point the run has reached."""
        reached = self.epochs_done + (1 if self.mid_epoch else 0)
        if max_epochs < reached:
            raise UserError(
                f"--max_epochs {max_epochs} ends before the run's position ({self.position()} of {self.checkpoint}); "
                f"pass --max_epochs {reached} or more, or start a new run"
            )


def as_flag(name: str, value: Any) -> str:
    """An option and its value as a command line writes it: ``--lr 0.1``, ``--no_hflip``, ``--milestones 0.5 0.75``."""
    if isinstance(value, bool):
        return f"--{name}" if value else f"--no_{name}"
    if isinstance(value, list | tuple):
        return f"--{name} {' '.join(str(v) for v in value)}"
    return f"--{name} {'none' if value is None else value}"


def _stored_config(checkpoint: dict[str, Any], given: FitConfig) -> FitConfig:
    """The run's config from a checkpoint; older checkpoints keep only model and data options."""
    if RUN_CONFIG_KEY in checkpoint:
        return FitConfig.from_flat(upgrade_names(checkpoint[RUN_CONFIG_KEY]))
    model_names = {k for k in as_dict(ModelConfig())}
    data_names = {k for k in as_dict(DataConfig())}
    hparams = upgrade_names(checkpoint.get("hyper_parameters", {}))
    data = upgrade_names(checkpoint.get("datamodule_hyper_parameters", {}))
    values = {k: v for k, v in hparams.items() if k in model_names and k != "num_classes"}
    values.update({k: v for k, v in data.items() if k in data_names})
    return FitConfig.from_flat(values, base=given)


# Options that together say which processes train; see plan_resume.
PROCESS_LAYOUT = frozenset({"accelerator", "devices", "num_nodes", "strategy"})


def plan_resume(config: FitConfig, explicit: Collection[str]) -> ResumePlan:
    """The run to continue, if ``--ckpt_path`` names one, with the options given now checked against it.

    ``explicit`` are the options the user gave (on the command line or in a config file): where one differs
    from the run's value, a "free" option (length, devices, logging, speed switches) takes the new value and
    is announced; a "fixed" one (data, split, model, optimisation) is refused, naming them all. The process layout
    (``PROCESS_LAYOUT``) comes from the run as a whole, or, once any part of it is given, from the options given now.
    """
    ckpt = config.run.ckpt_path
    if ckpt is None:
        return ResumePlan(config)
    arch = config.model.arch if "arch" in explicit else None
    if ckpt == "auto":
        found = newest_last_checkpoint(config.trainer.log_dir, arch)
        if found is None:
            note = f"no last.ckpt under {Path(config.trainer.log_dir) / (arch or '*')}: starting a new run"
            return ResumePlan(replace(config, run=replace(config.run, ckpt_path=None)), notes=[note])
        path = found
    elif ckpt == "last":
        path = find_last_checkpoint(config.trainer.log_dir, arch)
    else:
        path = Path(ckpt).expanduser().resolve()
    checkpoint = read_checkpoint(path)
    if "hyper_parameters" not in checkpoint or "loops" not in checkpoint:
        raise UserError(
            f"--ckpt_path {path} holds weights but no training state (a file of export.py?); continue a run from "
            "its checkpoints/last.ckpt"
        )
    stored = _stored_config(checkpoint, config)
    old, new = stored.flat(), config.flat()
    changed, refused = {}, []
    for name in sorted(set(explicit) - {"ckpt_path", "describe_data"}):
        if name not in new or new[name] == old.get(name):
            continue
        if option_spec(name).on_resume == "free":
            changed[name] = new[name]
        else:
            refused.append(f"{as_flag(name, new[name])} (the run's: {as_flag(name, old.get(name))})")
    if explicit_layout := PROCESS_LAYOUT & set(explicit):
        # The processes a run uses are one choice: naming part of a new layout does not keep the rest of the old one
        # (a 2-node checkpoint resumed with --devices 1 must not still wait for a second node).
        for name in sorted(PROCESS_LAYOUT - explicit_layout):
            if new[name] != old.get(name):
                changed[name] = new[name]
    if refused:
        raise UserError(
            f"{path} continues its run as it was started, and these would change what it learns: "
            f"{'; '.join(refused)}. Drop them to resume, or start a new run without --ckpt_path"
        )
    # A resumed run continues in the folder its checkpoint is in, wherever --log_dir points: that folder's log
    # directory is the run's, and a --log_dir naming another is said to have no effect rather than announced.
    unused = []
    location = run_location_of(path)
    if location is not None:
        if "log_dir" in explicit and Path(new["log_dir"]).resolve() != location.save_dir.resolve():
            unused.append(f"--log_dir {new['log_dir']} has no effect: the run continues in {location.path}")
        changed.pop("log_dir", None)
        changed["log_dir"] = str(location.save_dir)
    resumed = FitConfig.from_flat({**changed, "ckpt_path": str(path)}, base=stored)
    changed.pop("log_dir", None)
    notes = [f"{as_flag(name, value)} (was {as_flag(name, old.get(name))})" for name, value in changed.items()]
    notes += unused
    step = int(checkpoint.get("global_step", 0))
    return ResumePlan(resumed, path, completed_epochs(checkpoint), step, notes, checkpoint, _newer_state(path, step))


def _newer_state(path: Path, step: int) -> Path | None:
    """The ``last.ckpt`` of the run folder ``path`` is in, when it is another file at another step: resuming from
    ``path`` would then rewind the run."""
    location = run_location_of(path)
    if location is None:
        return None
    last = location.path / "checkpoints" / LAST_NAME
    if not last.is_file() or last.resolve() == path.resolve():
        return None
    return last if int(read_checkpoint(last).get("global_step", 0)) != step else None
