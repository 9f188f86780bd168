"""DataLoader worker processes that end with the process they load for."""

from __future__ import annotations

import ctypes
import os
import signal
import sys

from lightning.fabric.utilities.seed import pl_worker_init_function

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def end_with_parent(parent_pid: int) -> None:
    """Have Linux SIGKILL this process as soon as its parent ends; a no-op on other systems.

    torch's workers look for their parent only while they wait for work, and one whose parent was killed
    (SIGKILL, the OOM killer) can block for ever on its way out, flushing batches into a queue nobody reads
    any more: it stays alive, orphaned, holding its memory. Python has no binding for prctl, hence ctypes. The
    kernel sends the signal when the thread that started the worker ends; the loaders' iterators, which start
    the workers, are created by the training loop's thread, which lives as long as the run.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # no C library to ask: the worker ends as torch's own watchdog lets it
        return
    if os.getppid() != parent_pid:  # the parent ended before the request was made
        os.kill(os.getpid(), signal.SIGKILL)


def worker_init(parent_pid: int, rank: int, worker_id: int) -> None:
    """A loader's ``worker_init_fn``: end with the parent, and seed as Lightning seeds workers of a loader that
    has no init function of its own (after ``seed_everything(workers=True)``)."""
    end_with_parent(parent_pid)
    if int(os.environ.get("PL_SEED_WORKERS", 0)):
        pl_worker_init_function(worker_id, rank=rank)
