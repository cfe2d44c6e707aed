"""QA-LoRA: LoRA on group-pooled inputs over a frozen RTN weight, merged into the offsets at the end
(see ``dlqat.layers.qa_lora_linear``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from torch import nn

from dlqat.layers.qa_lora_linear import QALoRALinear
from dlqat.methods.base import Phase, QuantMethodConfig, param_of, require_steps
from dlqat.methods.registry import QuantMethod, register_method
from dlqat.surgery import name_filter, replace_linears


@dataclass
class QALoRAConfig(QuantMethodConfig):
    """QA-LoRA settings."""

    name: ClassVar[str] = "qa_lora"
    rank: int = field(default=16, metadata={"help": "LoRA rank r"})
    alpha: float = field(default=16.0, metadata={"help": "LoRA alpha; scaling = alpha / rank"})
    steps: int | None = field(default=None, metadata={"help": "optimizer steps; default 2000 (40 in the demo)"})
    lr: float = field(default=2e-4, metadata={"help": "learning rate of A, B"})


@register_method(QALoRAConfig)
class QALoRA(QuantMethod):
    def prepare(self, model: nn.Module, cfg: QALoRAConfig) -> list[str]:
        def make(_name: str, linear: nn.Linear) -> QALoRALinear:
            return QALoRALinear(linear, cfg.n_bits, cfg.group_size, cfg.rank, cfg.alpha)

        return replace_linears(model, make, name_filter(cfg.target_modules))

    def phases(self, cfg: QALoRAConfig, layer_names: list[str]) -> list[Phase]:
        require_steps(cfg, "steps")
        return [Phase("qa_lora: lora_a/lora_b", cfg.steps, cfg.lr, param_of("lora_a", "lora_b"))]

    def float_teacher(self, cfg: QALoRAConfig) -> bool:
        return False  # the frozen weight is stored as codes
