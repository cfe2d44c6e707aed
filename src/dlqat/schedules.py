"""Learning-rate schedules within a phase: pure functions of the step, so a resumed run sets the same
rates as an uninterrupted one without any scheduler state in the checkpoint."""

from __future__ import annotations

import math

LR_SCHEDULES = ("constant", "cosine", "linear")


def lr_factor(schedule: str, step_in_phase: int, phase_steps: int, warmup_steps: int = 0) -> float:
    """Multiplier of a phase's learning rates for its optimizer step ``step_in_phase`` (0-based).

    The first ``warmup_steps`` of the phase ramp linearly, ``(i + 1) / (warmup_steps + 1)`` (no step at lr 0;
    Adam's first updates are full-size whatever the gradient's scale, and a zero-initialised LoRA ``B`` takes
    them all at once). Then 1 for every schedule at the first step after warmup; ``cosine`` and ``linear``
    decay toward 0 at the phase's end over the remaining steps (the last step still trains, at a factor > 0).
    The factor depends only on the step, the phase length and the warmup: a resumed run sets the same rates,
    and at a constant lr a phase that grows on resume keeps every earlier step's rate."""
    if not 0 <= step_in_phase < phase_steps:
        raise ValueError(f"step_in_phase={step_in_phase}: expected 0 <= step < phase_steps={phase_steps}")
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule={schedule!r}: expected one of {', '.join(LR_SCHEDULES)}")
    if step_in_phase < warmup_steps:
        return (step_in_phase + 1) / (warmup_steps + 1)
    progress = (step_in_phase - warmup_steps) / (phase_steps - warmup_steps)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "linear":
        return 1.0 - progress
    return 1.0
