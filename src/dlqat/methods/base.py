"""What a method hands to the training loop: how to prepare the model and its training phases."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn


@dataclass(frozen=True)
class Phase:
    """One stretch of training with its own trainable set and optimizer.

    Attributes:
        name: shown in logs and the progress bar.
        steps: optimizer steps in this phase.
        lr: constant learning rate (AdamW).
        trains: ``trains(param_name) -> bool`` picks the parameters trained in this phase; all
            others are frozen.
    """

    name: str
    steps: int
    lr: float
    trains: Callable[[str], bool]


def set_trainable(model: nn.Module, trains: Callable[[str], bool]) -> list[str]:
    """Freeze every parameter but those ``trains`` selects; returns the selected names."""
    selected = []
    for name, param in model.named_parameters():
        param.requires_grad_(trains(name))
        if param.requires_grad:
            selected.append(name)
    return selected


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` over unique tensors (tied embeddings counted once)."""
    seen, trainable, total = set(), 0, 0
    for param in model.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        total += param.numel()
        trainable += param.numel() if param.requires_grad else 0
    return trainable, total
