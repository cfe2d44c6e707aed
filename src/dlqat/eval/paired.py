"""Paired accuracy differences between two models on the same questions, with a 95 % interval.

Two models answer the same questions, so the per-question difference (-1, 0 or +1) varies far less
than two independent accuracies when the models agree on most questions: "within 1 point of float"
can only be stated with this interval, not with each model's own +-1-2 points at n = 1-10k.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

Z95 = 1.959963984540054  # two-sided 95 % quantile of the standard normal


@dataclass(frozen=True)
class Difference:
    """``other - base`` accuracy (fraction, not points) and the half-width of its 95 % interval."""

    delta: float
    half_width: float
    n: int

    def points(self) -> str:
        return f"{100 * self.delta:+.1f} ± {100 * self.half_width:.1f}"


def report_metric(task_samples: Mapping[str, Sequence]) -> str:
    """The metric a task is reported by: length-normalised accuracy where the task has it."""
    return "acc_norm" if "acc_norm" in task_samples else "acc"


def paired_difference(base: Mapping[str, Sequence], other: Mapping[str, Sequence], metric: str) -> Difference:
    """Mean per-question difference of ``metric`` and its normal-approximation 95 % interval.

    ``base``/``other``: ``{"doc_id": [...], metric: [per-question score, ...]}`` of one task.
    """
    if list(base["doc_id"]) != list(other["doc_id"]):
        raise ValueError(
            f"paired difference needs the same questions; got {len(base['doc_id'])} vs {len(other['doc_id'])} "
            "(were both evaluated with the same --limit and task data?)"
        )
    diffs = [float(o) - float(b) for b, o in zip(base[metric], other[metric], strict=True)]
    n = len(diffs)
    if n == 0:
        raise ValueError("paired difference of zero questions")
    mean = sum(diffs) / n
    variance = sum((d - mean) ** 2 for d in diffs) / (n - 1) if n > 1 else 0.0
    return Difference(mean, Z95 * math.sqrt(variance / n), n)


def average_difference(diffs: Sequence[Difference]) -> Difference:
    """Unweighted mean over tasks (as papers average them); tasks are disjoint, so their variances add."""
    if not diffs:
        raise ValueError("average of no task differences")
    k = len(diffs)
    half_width = math.sqrt(sum(d.half_width**2 for d in diffs)) / k
    return Difference(sum(d.delta for d in diffs) / k, half_width, sum(d.n for d in diffs))


__all__ = ["Difference", "average_difference", "paired_difference", "report_metric"]
