"""Learning-rate schedules as closed forms of the optimizer step.

A closed form needs no scheduler state: the LR of any step follows from the step, the run's length and
the schedule's settings, so a resumed run, a run re-planned for another length and a CUDA graph that reads
the LR from a device tensor all see the same value. torch's chainable schedulers compute each LR from the
previous one (their rounding drifts over a run) and keep their length in private attributes, which is why
they are not used here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

ScheduleName = Literal["cosine", "multistep", "constant"]


@dataclass(frozen=True)
class LRSchedule:
    """``peak_lr`` reached after ``warmup_steps`` of linear warm-up, then cosine to 0, step decay or constant.

    Warm-up step ``s`` (0-based) runs at ``(s + 1) / warmup_steps`` of the peak. The cosine covers the
    ``total_steps - warmup_steps`` steps after the warm-up and ends at 0. The multistep schedule multiplies
    the peak by ``gamma`` at each milestone, given as fractions of the whole run (He et al. 2015 divide the LR
    by 10 at about 50% and 75% of training). With ``swa_steps``, the schedule covers the steps before the
    last ``swa_steps``, which run at the constant ``swa_lr`` (stochastic weight averaging).
    """

    peak_lr: float
    total_steps: int
    warmup_steps: int = 0
    name: ScheduleName = "cosine"
    milestones: tuple[float, ...] = (0.5, 0.75)
    gamma: float = 0.1
    swa_steps: int = 0
    swa_lr: float = 0.0

    def __post_init__(self) -> None:
        if self.total_steps < 1:
            raise ValueError(f"total_steps must be at least 1, got {self.total_steps}")
        if not 0 <= self.warmup_steps < self.total_steps:
            raise ValueError(f"warmup_steps must be in [0, {self.total_steps - 1}], got {self.warmup_steps}")
        if self.swa_steps and not 0 < self.swa_steps < self.total_steps - self.warmup_steps:
            raise ValueError(f"swa_steps {self.swa_steps} leave no step for the schedule before them")

    @property
    def scheduled_steps(self) -> int:
        """The steps the warm-up and the schedule span, before the SWA steps."""
        return self.total_steps - self.swa_steps

    @classmethod
    def for_run(
        cls,
        peak_lr: float,
        total_steps: int,
        epochs: int,
        warmup_epochs: float = 0.0,
        name: ScheduleName = "cosine",
        milestones: tuple[float, ...] = (0.5, 0.75),
        gamma: float = 0.1,
        swa_epochs: int = 0,
        swa_lr: float = 0.0,
    ) -> LRSchedule:
        """The schedule of a run of ``total_steps`` optimizer steps over ``epochs`` epochs, the last ``swa_epochs``
        of them at ``swa_lr``."""
        total_steps = max(1, int(total_steps))
        epochs = max(1, epochs)  # Lightning's max_epochs is -1 when a run is bounded by max_steps
        steps_per_epoch = total_steps / epochs
        warmup = min(total_steps - 1, round(warmup_epochs * steps_per_epoch))
        swa_steps = round(min(max(0, swa_epochs), epochs) * steps_per_epoch)
        if swa_steps and swa_steps >= total_steps - warmup:
            raise ValueError(f"--swa_epochs {swa_epochs} of {epochs} epochs leave no epoch for the schedule before SWA")
        return cls(peak_lr, total_steps, max(0, warmup), name, tuple(milestones), gamma, swa_steps, swa_lr)

    def milestone_steps(self) -> tuple[int, ...]:
        """The steps at which the multistep schedule decays."""
        return tuple(round(fraction * self.scheduled_steps) for fraction in self.milestones)

    def __call__(self, step: int) -> float:
        """The LR of optimizer step ``step`` (0-based)."""
        if self.swa_steps and step >= self.scheduled_steps:
            return self.swa_lr
        if step < self.warmup_steps:
            return self.peak_lr * (step + 1) / self.warmup_steps
        if self.name == "constant":
            return self.peak_lr
        if self.name == "multistep":
            decays = sum(step >= milestone for milestone in self.milestone_steps())
            return self.peak_lr * self.gamma**decays
        length = self.scheduled_steps - self.warmup_steps
        progress = min(step - self.warmup_steps, length) / length
        return self.peak_lr * (1 + math.cos(math.pi * progress)) / 2

    def describe(self) -> str:
        """One line, e.g. ``cosine over 70,200 steps after 351 warm-up steps, peak 0.1``."""
        warmup = f" after {self.warmup_steps:,} warm-up steps" if self.warmup_steps else ""
        if self.name == "multistep":
            steps = ", ".join(f"{s:,}" for s in self.milestone_steps())
            shape = f"x{self.gamma:g} at steps {steps} of {self.scheduled_steps:,}"
        elif self.name == "constant":
            shape = f"constant over {self.scheduled_steps:,} steps"
        else:
            shape = f"cosine over {self.scheduled_steps - self.warmup_steps:,} steps"
        swa = f", then SWA at {self.swa_lr:g} for {self.swa_steps:,} steps" if self.swa_steps else ""
        return f"{shape}{warmup}, peak {self.peak_lr:g}{swa}"
