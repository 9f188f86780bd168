"""Only the messages that apply: Lightning's banners and notices that say nothing about this run, silenced
while a script runs (and restored after, so importing the package changes no global setting)."""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
from collections.abc import Iterator

# Lightning's start-up and shutdown lines that the scripts replace with their own (device, precision, result).
_BANNERS = re.compile(
    r"^(\N{ELECTRIC LIGHT BULB} Tip|GPU available:|TPU available:|HPU available:|LOCAL_RANK: \d+ - CUDA_VISIBLE_DEVICES"
    r"|Using (bfloat16|16bit) Automatic Mixed Precision|`Trainer\.(fit|test|validate|predict)` stopped:"
    r"|Restoring states from the checkpoint path|Restored all states from the checkpoint"
    r"|(\[rank: \d+\] )?Received SIGTERM)"
)
_LOGGERS = (
    "lightning.pytorch.utilities.rank_zero",
    "lightning.pytorch.accelerators.cuda",
    "lightning.pytorch.trainer.connectors.signal_connector",
)

# Notices about settings this project chose on purpose, or that torch raises inside Lightning.
_NOT_APPLICABLE = (
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",  # Lightning calls a deprecated torch check
    r"Using ModelCheckpoint with manual optimization",  # checkpoints hold the state after each (whole) step
    r".*does not have many workers",  # batches come from memory: worker processes only add a hop
    r"The number of training batches \(\d+\) is smaller than the logging interval",  # the step logs itself
    r"Checkpoint directory .* exists and is not empty",  # a resumed run continues its own folder
    r"The `srun` command is available on your system but is not used",  # a SLURM hint on login nodes
    # Epoch figures that are already equal on every process: training sums are all-reduced by the module, the
    # best accuracy follows the synced val/acc, throughput is already scaled to all processes.
    r"It is recommended to use `self\.log\('(train/(loss|acc|acc_top5|images_per_sec)|val/acc_best)'",
)


class _DropBanners(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not _BANNERS.match(str(record.getMessage()))


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Drop Lightning's banners and the warnings listed above for the duration of the block."""
    banner_filter = _DropBanners()
    loggers = [logging.getLogger(name) for name in _LOGGERS]
    for logger in loggers:
        logger.addFilter(banner_filter)
    try:
        with warnings.catch_warnings():
            for pattern in _NOT_APPLICABLE:
                warnings.filterwarnings("ignore", message=pattern)
            yield
    finally:
        for logger in loggers:
            logger.removeFilter(banner_filter)
