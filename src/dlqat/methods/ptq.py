"""Post-training baselines: RTN, GPTQ, and "LoRA fine-tune in float, then RTN/GPTQ".

``rtn`` and ``gptq`` train nothing. ``lora_rtn``/``lora_gptq`` train a plain LoRA on the float model
(the adapter outside any quantizer), merge it, then quantize: the two-step pipeline DL-QAT argues
against. GPTQ runs block by block as the reference implementation does (each decoder block calibrated
on the outputs of the already-quantized blocks, ``dlqat.methods.calibration``); ``--no_sequential``
takes every Hessian from one pass through the float model instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from dlqat.layers import ClipMode, QuantizedLinear, QuantLoRALinear
from dlqat.methods.base import Phase, QuantMethodConfig, param_of, swap_in_quant_lora
from dlqat.methods.calibration import collect_hessians, quantize_block_by_block
from dlqat.quant.gptq import gptq_quantize
from dlqat.surgery import name_filter, replace_linears

STARTS_AT_RTN = False
_ALGOS = ("rtn", "gptq")


@dataclass
class PTQConfig(QuantMethodConfig):
    """Post-training quantization settings (``lora_*``: float LoRA first)."""

    method: ClassVar[str] = "gptq"
    algorithm: str = field(default="gptq", metadata={"help": "rtn or gptq"})
    lora_first: bool = field(default=False, metadata={"help": "fine-tune a float LoRA first, merge, then quantize"})
    rank: int = field(default=16, metadata={"help": "LoRA rank (lora_first)"})
    alpha: float = field(default=16.0, metadata={"help": "LoRA alpha (lora_first)"})
    steps: int | None = field(default=None, metadata={"help": "LoRA steps (lora_first); default 2000 (40 demo)"})
    lr: float = field(default=2e-4, metadata={"help": "LoRA learning rate (lora_first)"})
    calib_samples: int = field(default=128, metadata={"help": "GPTQ calibration examples (from the training data)"})
    damp: float = field(default=0.01, metadata={"help": "GPTQ dampening, fraction of the mean Hessian diagonal"})
    sequential: bool = field(
        default=True,
        metadata={
            "help": "GPTQ block by block on the quantized blocks' outputs (reference GPTQ); false: one float pass"
        },
    )

    def __post_init__(self) -> None:
        if self.algorithm not in _ALGOS:
            raise ValueError(f"algorithm={self.algorithm!r}: expected one of {_ALGOS}")
        super().__post_init__()


def prepare(model: nn.Module, cfg: PTQConfig) -> list[str]:
    """Float LoRA layers when ``lora_first`` (quantizer off); otherwise just find the targets."""
    if cfg.lora_first:
        return swap_in_quant_lora(
            model, cfg, rank=cfg.rank, alpha=cfg.alpha, use_magnitude=False, clip_mode=ClipMode.DYNAMIC,
            quantize_enabled=False,
        )  # fmt: skip
    should = name_filter(cfg.target_modules)
    names = [n for n, m in model.named_modules() if n and should(n, m)]
    if not names:
        raise ValueError("no linear layer matched the target filter")
    return names


def phases(cfg: PTQConfig, layer_names: list[str] | None = None) -> list[Phase]:
    if not cfg.lora_first:
        return []
    return [Phase("float lora: lora_a/lora_b", cfg.steps, cfg.lr, param_of("lora_a", "lora_b"))]


def _merge_lora(model: nn.Module) -> None:
    def make(_name: str, layer: QuantLoRALinear) -> nn.Linear:
        linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        linear.weight = nn.Parameter(layer.merged_weight().detach(), requires_grad=False)
        linear.bias = layer.bias
        return linear

    replace_linears(model, make, lambda _n, m: isinstance(m, QuantLoRALinear))


def finalize(model: nn.Module, cfg: PTQConfig, layer_names: list[str], calibration: list[torch.Tensor]) -> None:
    """Merge a float LoRA if any, then replace the target linears by RTN or GPTQ ``QuantizedLinear``s."""
    if cfg.lora_first:
        _merge_lora(model)

    def rtn(name: str, linear: nn.Linear) -> QuantizedLinear:
        return QuantizedLinear.round_to_nearest(linear.weight, cfg.n_bits, cfg.group_size, linear.bias)

    def gptq_layers(names: list[str], hessians: dict[str, torch.Tensor]) -> None:
        def make(name: str, linear: nn.Linear) -> QuantizedLinear:
            w = linear.weight.detach().float()
            q, scale, offset = gptq_quantize(w, hessians.pop(name), cfg.n_bits, cfg.group_size, cfg.damp)
            return QuantizedLinear.from_codes(q, scale, offset, cfg.n_bits, cfg.group_size, linear.bias)

        wanted = set(names)
        replace_linears(model, make, lambda n, _m: n in wanted)

    batches = calibration[: cfg.calib_samples]
    if cfg.algorithm == "rtn":
        wanted = set(layer_names)
        replace_linears(model, rtn, lambda n, _m: n in wanted)
    elif cfg.sequential:
        quantize_block_by_block(model, layer_names, batches, gptq_layers)
    else:
        gptq_layers(layer_names, collect_hessians(model, layer_names, batches))
