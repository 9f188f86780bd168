"""Every use of Lightning's internal loop state, in one place.

Lightning's public API has no way to ask "did this epoch's validation finish?" or to tell a restored fit "run
this epoch's validation again"; both live in the fit loop's progress counters, which Lightning saves in every
checkpoint (``checkpoint["loops"]["fit_loop"]``) and reads back on resume. The functions here read and write
exactly those counters; ``tests/test_lightning_compat.py`` pins each one against the installed Lightning, so a
release that changes them fails there, not in a user's resumed run.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.trainer.states import TrainerFn

# Keys of the fit loop's state inside a checkpoint (lightning.pytorch.loops.fit_loop._FitLoop.state_dict).
TRAIN_BATCH_PROGRESS = "epoch_loop.batch_progress"
VAL_BATCH_PROGRESS = "epoch_loop.val_loop.batch_progress"


def _validation_due(trainer: L.Trainer) -> bool:
    """Whether the current epoch ends with a validation (Lightning's ``_should_check_val_epoch``)."""
    every = trainer.check_val_every_n_epoch
    return trainer.enable_validation and (every is None or (trainer.current_epoch + 1) % every == 0)


def validation_unfinished(trainer: L.Trainer) -> bool:
    """Whether the fit is past its epoch's last training batch but the epoch's validation has not finished.

    True during a validation of the fit (not the sanity check) that has batches left, and at the end of an epoch's
    last training batch when a validation follows (``on_train_batch_end``: the batch is processed, not completed).
    """
    if trainer.state.fn != TrainerFn.FITTING or trainer.sanity_checking:
        return False
    epoch_loop = trainer.fit_loop.epoch_loop
    if trainer.validating:
        done = epoch_loop.val_loop.batch_progress.current.completed
        return done < sum(trainer.num_val_batches)
    train = epoch_loop.batch_progress.current
    return (
        train.processed >= trainer.num_training_batches
        and train.completed < train.processed
        and _validation_due(trainer)
    )


def mark_validation_pending(checkpoint: dict[str, Any]) -> None:
    """Make a checkpoint resume with its epoch's training done and its validation run again from the first batch.

    The training batch counters are set to "last batch completed" (Lightning resumes such a checkpoint without
    training again) and the validation counters to "first batch started, none processed": Lightning then restarts
    the validation, and since no batch counts as done it starts at batch 0 with fresh metrics. Left as they were,
    Lightning would skip the validation (a save in validation) or never run it (a save at the last batch's end).
    """
    loops = checkpoint["loops"]["fit_loop"]
    train = loops[TRAIN_BATCH_PROGRESS]
    for part in ("total", "current"):
        train[part]["completed"] = train[part]["processed"]
    train["is_last_batch"] = True
    val = loops[VAL_BATCH_PROGRESS]
    for part in ("total", "current"):
        val[part] = {"ready": 1, "started": 1, "processed": 0, "completed": 0}
    val["is_last_batch"] = False


def completed_epochs(checkpoint: dict[str, Any]) -> int:
    """Epochs whose training a checkpoint has finished (a mid-epoch checkpoint counts its epoch as not done)."""
    progress = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_progress", {}).get("current", {})
    return int(progress.get("processed", checkpoint.get("epoch", 0)))


def epoch_in_progress(checkpoint: dict[str, Any]) -> bool:
    """Whether a checkpoint was written inside an epoch (its training or its validation not finished)."""
    progress = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_progress", {}).get("current", {})
    return int(progress.get("started", 0)) > int(progress.get("processed", 0))


def batches_done_in_epoch(checkpoint: dict[str, Any]) -> int:
    """Training batches a checkpoint has finished in the epoch it was written in (0 at an epoch's start)."""
    if not epoch_in_progress(checkpoint):
        return 0
    progress = checkpoint["loops"]["fit_loop"].get(TRAIN_BATCH_PROGRESS, {}).get("current", {})
    return int(progress.get("completed", 0))
