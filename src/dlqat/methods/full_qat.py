"""Full-weight QAT (LLM-QAT style): every target weight trained through the fake quantizer, with a
dynamic min/max range. The expensive upper baseline: trains (and keeps optimizer state for) all
linear weights."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from torch import nn

from dlqat.layers import ClipMode
from dlqat.methods.base import Phase, QuantMethodConfig, StorageFields, require_steps, swap_in_quant_lora
from dlqat.methods.registry import QuantMethod, register_method


@dataclass
class FullQATConfig(QuantMethodConfig, StorageFields):
    """Full-weight QAT settings."""

    name: ClassVar[str] = "full_qat"
    steps: int | None = field(default=None, metadata={"help": "optimizer steps; default 2000 (40 in the demo)"})
    lr: float = field(default=2e-5, metadata={"help": "learning rate of the weights"})


@register_method(FullQATConfig)
class FullQAT(QuantMethod):
    def prepare(self, model: nn.Module, cfg: FullQATConfig) -> list[str]:
        # the weight itself needs a gradient: plain autograd instead of the lean backward (rank-1 B stays 0)
        return swap_in_quant_lora(
            model, cfg, rank=1, alpha=1.0, use_magnitude=False, clip_mode=ClipMode.DYNAMIC, lean=False
        )

    def phases(self, cfg: FullQATConfig, layer_names: list[str]) -> list[Phase]:
        require_steps(cfg, "steps")
        weights = {f"{name}.weight" for name in layer_names}
        return [Phase("full_qat: weights", cfg.steps, cfg.lr, weights.__contains__)]

    def float_teacher(self, cfg: FullQATConfig) -> bool:
        return False  # the float weight is what trains

    def starts_at(self, cfg: FullQATConfig) -> str:
        return cfg.start_label()
