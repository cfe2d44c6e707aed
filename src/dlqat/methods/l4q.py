"""L4Q (Jeon et al., 2024): ``W = Q(W0 + scaling * B @ A)`` with ``scale, offset`` learned jointly
with ``A, B`` from the start (LSQ gradients), on the memory-lean backward of ``QuantLoRALinear``
(saves the input and small tensors only; see ``dlqat.quant.lean_linear``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from torch import nn

from dlqat.layers import ClipMode
from dlqat.methods.base import Phase, QuantMethodConfig, StorageFields, param_of, require_steps, swap_in_quant_lora
from dlqat.methods.gptq_start import GPTQStart
from dlqat.methods.registry import QuantMethod, register_method


@dataclass
class L4QConfig(QuantMethodConfig, StorageFields):
    """L4Q settings."""

    name: ClassVar[str] = "l4q"
    rank: int = field(default=16, metadata={"help": "LoRA rank r"})
    alpha: float = field(default=16.0, metadata={"help": "LoRA alpha; scaling = alpha / rank"})
    init: str = field(
        default="minmax",
        metadata={
            "help": "scale/offset start: minmax (untrained = RTN), mse (per-group clipping search), gptq or gptq-mse "
            "(untrained = GPTQ, with min/max or searched group ranges; kd then keeps a float copy as its teacher)"
        },
    )
    steps: int | None = field(default=None, metadata={"help": "optimizer steps; default 2000 (40 in the demo)"})
    lr: float = field(default=2e-4, metadata={"help": "learning rate of A, B"})
    quant_lr: float = field(default=1e-4, metadata={"help": "learning rate of scale, offset"})

    @property
    def resolved_init(self) -> str:
        """``init`` (no bit-width default here); read under DL-QAT's name by the shared GPTQ-start steps."""
        return self.init


@register_method(L4QConfig)
class L4Q(GPTQStart, QuantMethod):
    def prepare(self, model: nn.Module, cfg: L4QConfig) -> list[str]:
        return swap_in_quant_lora(
            model, cfg, rank=cfg.rank, alpha=cfg.alpha, use_magnitude=False, clip_mode=ClipMode.JOINT, init=cfg.init
        )

    def phases(self, cfg: L4QConfig, layer_names: list[str]) -> list[Phase]:
        require_steps(cfg, "steps")
        trains = param_of("lora_a", "lora_b", "scale", "offset")
        quant_lrs = {"scale": cfg.quant_lr, "offset": cfg.quant_lr}
        return [Phase("l4q: lora_a/lora_b/scale/offset", cfg.steps, cfg.lr, trains, quant_lrs)]

    def default_loss(self, cfg: QuantMethodConfig) -> str:
        return "kd"  # measured: lower held-out perplexity than ce at every lr tried (README, recipe study)

    def starts_at(self, cfg: L4QConfig) -> str:
        return cfg.start_label(cfg.init)
