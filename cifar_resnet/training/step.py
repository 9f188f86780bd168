"""The training step's device-side bookkeeping and its replay as one CUDA graph.

On a GPU a ResNet step of a few milliseconds is launched as several hundred small kernels; issuing them
one by one from Python costs more host time than the GPU needs to run them. A CUDA graph records the whole
step (forward, loss, backward, the fused SGD update reading a device-tensor LR, and the running sums below)
once and replays it with one launch. Everything a replay touches must keep its storage: parameters,
gradients, optimizer state, the LR tensor, the sums, and the static input buffers the batch is copied into.
"""

from __future__ import annotations

from collections.abc import Callable
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


class GraphBackend(Protocol):
    """How a step is warmed up, captured and replayed (CUDA graphs, or a stand-in in tests)."""

    def warmup(self, run: Callable[[], None]) -> None: ...

    def capture(self, run: Callable[[], None]) -> None: ...

    def replay(self) -> None: ...


class CUDAGraphBackend:
    """torch.cuda.CUDAGraph: warm-up on a side stream, capture, replay (the recipe of torch's CUDA-graph notes)."""

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


class GraphedStep:
    """Runs ``step(*batch)`` eagerly ``warmup`` times, then captures it once and replays it.

    ``step`` must run the whole optimizer step and write only tensors whose storage stays in place (it
    zeroes gradients rather than dropping them). The capture records on static copies of the batch's tensors
    (images, labels, and a mixed batch's λ); each later call copies its batch into them and replays.
    Capturing does not run the step, so the capturing call replays right after. Batches must keep their
    shapes (the training loader drops the last short batch).
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
                self.backend.warmup(lambda: self.step(*batch))
                return
            static = tuple(t.clone() for t in batch)
            self.backend.capture(lambda: self.step(*static))
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
        self.backend.replay()
