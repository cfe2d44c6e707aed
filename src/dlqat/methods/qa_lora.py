"""QA-LoRA: LoRA on group-pooled inputs over a frozen quantized weight, merged into the offsets at the
end (see ``dlqat.layers.qa_lora_linear``). The base is RTN, or GPTQ on calibration data (``base="gptq"``,
the QA-LoRA paper's: its models start from GPTQ checkpoints; it used rank 64 at g128; ``base="gptq-mse"``:
GPTQ with its clipping search, the strong start at 2 bits where min/max GPTQ collapses)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from dlqat.layers.qa_lora_linear import QALoRALinear
from dlqat.layers.weight_quantizer import GPTQ_INITS
from dlqat.methods.base import Phase, QuantMethodConfig, param_of, require_steps
from dlqat.methods.calibration import quantize_block_by_block
from dlqat.methods.registry import QuantMethod, register_method
from dlqat.quant.gptq import gptq_quantize
from dlqat.surgery import name_filter, replace_linears


@dataclass
class QALoRAConfig(QuantMethodConfig):
    """QA-LoRA settings."""

    name: ClassVar[str] = "qa_lora"
    # The baseline as the QA-LoRA paper ran it: GPTQ checkpoints as the frozen base, rank 64, alpha 16 at
    # group size 128. The lr stays a flag: the paper's was tuned for 7B+ models over thousands of steps.
    presets: ClassVar[dict[str, dict]] = {"paper": {"base": "gptq", "rank": 64, "alpha": 16.0}}
    rank: int = field(default=16, metadata={"help": "LoRA rank r"})
    alpha: float = field(default=16.0, metadata={"help": "LoRA alpha; scaling = alpha / rank"})
    steps: int | None = field(default=None, metadata={"help": "optimizer steps; default 2000 (40 in the demo)"})
    lr: float = field(default=2e-4, metadata={"help": "learning rate of A, B"})
    base: str = field(
        default="rtn",
        metadata={
            "help": "frozen base: rtn (min/max), gptq on 128 calibration examples (the paper's), or gptq-mse "
            "(GPTQ with its clipping search)"
        },
    )

    def __post_init__(self) -> None:
        if self.base not in _BASES:
            raise ValueError(f"base={self.base!r}: expected one of {', '.join(_BASES)}")
        super().__post_init__()


_BASES = ("rtn", *GPTQ_INITS)  # a GPTQ base names its grid as the --init of the same name
GPTQ_BASE_SAMPLES = 128  # calibration examples for a GPTQ base (the GPTQ baseline's default)


@register_method(QALoRAConfig)
class QALoRA(QuantMethod):
    def prepare(self, model: nn.Module, cfg: QALoRAConfig) -> list[str]:
        def make(_name: str, linear: nn.Linear) -> QALoRALinear:
            keep = cfg.base in GPTQ_INITS
            return QALoRALinear(linear, cfg.n_bits, cfg.group_size, cfg.rank, cfg.alpha, keep_float=keep)

        return replace_linears(model, make, name_filter(cfg.target_modules))

    def phases(self, cfg: QALoRAConfig, layer_names: list[str]) -> list[Phase]:
        require_steps(cfg, "steps")
        return [Phase("qa_lora: lora_a/lora_b", cfg.steps, cfg.lr, param_of("lora_a", "lora_b"))]

    def calibrate(self, model: nn.Module, cfg: QALoRAConfig, layer_names: list[str], calibration) -> None:
        """A GPTQ base: GPTQ block by block (each block calibrated on the quantized blocks before it), the
        codes, scales and offsets of every layer replaced by GPTQ's on the base's grid."""
        grid = GPTQ_INITS.get(cfg.base)
        if grid is None:
            return

        def quantize_layers(block: list[str], hessians: dict[str, torch.Tensor]) -> None:
            for name in block:
                layer = model.get_submodule(name)
                q, scale, offset = gptq_quantize(
                    layer.float_weight, hessians.pop(name), cfg.n_bits, cfg.group_size, grid=grid
                )
                layer.set_codes(q, scale, offset)

        for name in layer_names:  # a block calibrates on float layers of its own, quantized ones before it
            model.get_submodule(name).in_float = True
        quantize_block_by_block(model, layer_names, calibration[:GPTQ_BASE_SAMPLES], quantize_layers)

    def float_teacher(self, cfg: QALoRAConfig) -> bool:
        return False  # the frozen weight is stored as codes

    def calibrated_state(self, model: nn.Module, cfg: QALoRAConfig, layer_names: list[str]) -> dict[str, torch.Tensor]:
        if cfg.base not in GPTQ_INITS:
            return {}
        layers = {name: model.get_submodule(name) for name in layer_names}
        return {
            f"{name}.{key}": getattr(layer, key) for name, layer in layers.items() for key in ("q", "scale", "offset")
        }

    def load_calibrated(
        self, model: nn.Module, cfg: QALoRAConfig, layer_names: list[str], state: dict[str, torch.Tensor]
    ) -> None:
        for name in layer_names:
            layer = model.get_submodule(name)
            layer.set_codes(*(state[f"{name}.{key}"].to(layer.q.device) for key in ("q", "scale", "offset")))

    def starts_at(self, cfg: QALoRAConfig) -> str:
        return cfg.base  # B = 0: the untrained model is the base (RTN, or GPTQ's model)
