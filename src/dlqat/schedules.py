"""Learning-rate schedules within a phase: pure functions of the step, so a resumed run sets the same
rates as an uninterrupted one without any scheduler state in the checkpoint."""

from __future__ import annotations

import math

LR_SCHEDULES = ("constant", "cosine", "linear")


def lr_factor(schedule: str, step_in_phase: int, phase_steps: int) -> float:
    """Multiplier of a phase's learning rates for its optimizer step ``step_in_phase`` (0-based): 1 at the
    first step for every schedule; ``cosine`` and ``linear`` decay toward 0 at the phase's end (the last
    step still trains, at ``factor(n - 1) > 0``)."""
    if not 0 <= step_in_phase < phase_steps:
        raise ValueError(f"step_in_phase={step_in_phase}: expected 0 <= step < phase_steps={phase_steps}")
    progress = step_in_phase / phase_steps
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "linear":
        return 1.0 - progress
    raise ValueError(f"lr_schedule={schedule!r}: expected one of {', '.join(LR_SCHEDULES)}")
