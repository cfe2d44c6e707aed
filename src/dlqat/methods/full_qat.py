"""Full-weight QAT (LLM-QAT style): every target weight trained through the fake quantizer, with a
dynamic min/max range. The expensive upper baseline: trains (and keeps optimizer state for) all
linear weights."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from torch import nn

from dlqat.layers import ClipMode, QuantLoRALinear
from dlqat.methods.base import Phase, QuantMethodConfig
from dlqat.surgery import name_filter, replace_linears

STARTS_AT_RTN = True


@dataclass
class FullQATConfig(QuantMethodConfig):
    """Full-weight QAT settings."""

    method: ClassVar[str] = "full_qat"
    steps: int | None = field(default=None, metadata={"help": "optimizer steps; default 2000 (60 in the demo)"})
    lr: float = field(default=2e-5, metadata={"help": "learning rate of the weights"})


def prepare(model: nn.Module, cfg: FullQATConfig) -> list[str]:
    def make(_name: str, linear: nn.Linear) -> QuantLoRALinear:
        layer = QuantLoRALinear.from_linear(
            linear,
            n_bits=cfg.n_bits,
            group_size=cfg.group_size,
            rank=1,
            alpha=1.0,
            use_magnitude=False,
            clip_mode=ClipMode.DYNAMIC,
        )
        layer.lean = False  # the weight itself needs a gradient: plain autograd
        return layer

    return replace_linears(model, make, name_filter(cfg.target_modules))


def phases(cfg: FullQATConfig, layer_names: list[str]) -> list[Phase]:
    weights = {f"{name}.weight" for name in layer_names}
    return [Phase("full_qat: weights", cfg.steps, cfg.lr, weights.__contains__)]
