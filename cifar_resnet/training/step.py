"""The training step's device-side bookkeeping and its replay as one CUDA graph.

On a GPU a ResNet step of a few milliseconds is launched as several hundred small kernels; issuing them
one by one from Python costs more host time than the GPU needs to run them. A CUDA graph records the whole
step (forward, loss, backward, the fused SGD update reading a device-tensor LR, and the running sums below)
once and replays it with one launch. Everything a replay touches must keep its storage: parameters,
gradients, optimizer state, the LR tensor, the sums, and the static input buffers the batch is copied into.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

# Columns of TrainingTally.sums.
LOSS_TIMES_IMAGES, TOP1_HITS, TOPK_HITS, IMAGES = range(4)


class TrainingTally(nn.Module):
    """The current epoch's training sums and the divergence watch, kept on the device and updated in place.

    ``sums`` holds loss × images, top-1 hits, top-k hits and images; the host reads it once an epoch.
    ``streak`` counts consecutive non-finite losses and ``diverged_at`` records the step where a streak of
    ``max_nonfinite`` began (-1 while none has), read every few dozen steps by the divergence stop. Updating
    in place with tensor ops only, never reading a value back, keeps the step free of host syncs and lets a
    CUDA graph carry the update.
    """

    def __init__(self, top_k: int = 5, max_nonfinite: int = 3) -> None:
        super().__init__()
        self.top_k = top_k
        self.max_nonfinite = max_nonfinite
        self.register_buffer("sums", torch.zeros(4))
        self.register_buffer("streak", torch.zeros((), dtype=torch.int64))
        self.register_buffer("streak_start", torch.zeros((), dtype=torch.int64))
        self.register_buffer("diverged_at", torch.full((), -1, dtype=torch.int64))
        # The index of the next step, set from the trainer's global step when training starts.
        self.register_buffer("step", torch.zeros((), dtype=torch.int64), persistent=False)

    @torch.no_grad()
    def update(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Add one step's loss and hits; advance the non-finite streak."""
        loss = loss.detach().float()
        hits = logits.detach().topk(self.top_k, dim=1).indices.eq(labels.unsqueeze(1))
        counts = torch.stack((loss * labels.shape[0], hits[:, 0].sum().float(), hits.any(dim=1).sum().float()))
        self.sums[:IMAGES].add_(counts)
        self.sums[IMAGES].add_(labels.shape[0])
        bad = ~torch.isfinite(loss)
        self.streak.copy_(torch.where(bad, self.streak + 1, torch.zeros_like(self.streak)))
        self.streak_start.copy_(torch.where(bad & (self.streak == 1), self.step, self.streak_start))
        tripped = (self.streak >= self.max_nonfinite) & (self.diverged_at < 0)
        self.diverged_at.copy_(torch.where(tripped, self.streak_start, self.diverged_at))
        self.step.add_(1)

    def reset_sums(self) -> None:
        """Start a new epoch's sums (in place: a captured graph keeps writing to the same storage)."""
        self.sums.zero_()


# Operations that make the host wait for the device when their input lives on a GPU: reading a value
# (item, float, bool, int, if tensor), data-dependent output sizes, whole-tensor comparisons, and tensors
# built from Python data (a blocking copy from pageable memory). The doctor and the tests count these.
SYNCING_OPS = frozenset({
    "_local_scalar_dense", "nonzero", "_unique2", "unique_dim", "unique_consecutive", "masked_select", "is_nonzero",
    "equal", "lift_fresh", "repeat_interleave", "bincount", "histc",
})  # fmt: skip


class GraphCaptureError(RuntimeError):
    """Warming up or capturing the step failed; ``phase`` is ``"warm-up"`` or ``"capture"``."""

    def __init__(self, phase: str, cause: BaseException) -> None:
        super().__init__(f"CUDA graph {phase} failed: {error_line(cause)}")
        self.phase = phase
        self.cause = cause


class GraphReplayError(RuntimeError):
    """Replaying the captured step failed. On CUDA the context is then unusable: the run must end, and a
    resumed run (a new process) captures again. ``step`` (the training step) is filled in by the module and
    ``checkpoint`` (the one to resume from) by the script that reports the error."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(error_line(cause))
        self.cause = cause
        self.step: int | None = None
        self.checkpoint: Path | None = None

    def __str__(self) -> str:
        at = f" at step {self.step}" if self.step is not None else ""
        return f"the CUDA graph of the training step failed{at}: {error_line(self.cause)}"


def error_line(error: BaseException) -> str:
    """An error as one line: its type and the first line of its message."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


class GraphBackend(Protocol):
    """How a step is warmed up, captured and replayed (CUDA graphs, or a stand-in on the CPU)."""

    description: str  # how the step runs, for the line a fit prints when its training starts

    def warmup(self, run: Callable[[], None]) -> None: ...

    def capture(self, run: Callable[[], None]) -> None: ...

    def replay(self) -> None: ...


class CUDAGraphBackend:
    """torch.cuda.CUDAGraph: warm-up on a side stream, capture, replay (the recipe of torch's CUDA-graph notes)."""

    description = "one CUDA graph per step"

    def __init__(self) -> None:
        self.graph: torch.cuda.CUDAGraph | None = None

    def warmup(self, run: Callable[[], None]) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            run()
        torch.cuda.current_stream().wait_stream(side)

    def capture(self, run: Callable[[], None]) -> None:
        graph = torch.cuda.CUDAGraph()
        # thread_local: the asynchronous checkpoint writer may copy tensors in its own thread meanwhile.
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            run()
        self.graph = graph

    def replay(self) -> None:
        assert self.graph is not None, "capture first"
        self.graph.replay()


class EagerReplayBackend:
    """Stands in for a CUDA graph where there is none (the CPU): capturing records the step without running it,
    as CUDA capture does, and a replay runs it eagerly on the same static buffers. Everything but CUDA's own
    recording is exercised: warm-up, static inputs, in-place LR and sums, zeroed (not dropped) gradients,
    replay counting, Lightning's step count and the fallback on a failed capture."""

    description = "recorded once, replayed eagerly (a stand-in for a CUDA graph)"

    def __init__(self) -> None:
        self.run: Callable[[], None] | None = None
        self.warmups = 0
        self.replays = 0
        self.replaying = False

    def warmup(self, run: Callable[[], None]) -> None:
        self.warmups += 1
        run()

    def capture(self, run: Callable[[], None]) -> None:
        self.run = run

    def replay(self) -> None:
        assert self.run is not None, "capture first"
        self.replays += 1
        self.replaying = True
        try:
            self.run()
        finally:
            self.replaying = False


class GraphedStep:
    """Runs ``step(*batch)`` eagerly ``warmup`` times, then captures it once and replays it.

    ``step`` must run the whole optimizer step and write only tensors whose storage stays in place (it
    zeroes gradients rather than dropping them). The capture records on static copies of the batch's tensors
    (images, labels, and a mixed batch's λ); each later call copies its batch into them and replays.
    Capturing does not run the step, so the capturing call replays right after. Batches must keep their
    shapes (the training loader drops the last short batch).

    An error while warming up or capturing raises :class:`GraphCaptureError` (the caller goes on eagerly); an
    error in a replay raises :class:`GraphReplayError`.
    """

    def __init__(self, step: Callable[..., None], backend: GraphBackend, warmup: int = 3) -> None:
        self.step = step
        self.backend = backend
        self.warmup = warmup
        self.eager_calls = 0
        self.static: tuple[torch.Tensor, ...] | None = None

    @property
    def captured(self) -> bool:
        return self.static is not None

    def __call__(self, *batch: torch.Tensor) -> None:
        if self.static is None:
            if self.eager_calls < self.warmup:
                self.eager_calls += 1
                try:
                    self.backend.warmup(lambda: self.step(*batch))
                except Exception as err:
                    raise GraphCaptureError("warm-up", err) from err
                return
            static = tuple(t.clone() for t in batch)
            try:
                self.backend.capture(lambda: self.step(*static))
            except Exception as err:
                raise GraphCaptureError("capture", err) from err
            self.static = static
        else:
            shapes = [tuple(t.shape) for t in batch]
            if shapes != [tuple(t.shape) for t in self.static]:
                raise RuntimeError(
                    f"a captured training step needs batches of one shape: got {shapes[0]}, "
                    f"captured {tuple(self.static[0].shape)}"
                )
            for target, source in zip(self.static, batch, strict=True):
                target.copy_(source)
        try:
            self.backend.replay()
        except Exception as err:
            raise GraphReplayError(err) from err
