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
from dlqat.methods.base import Phase, QuantMethodConfig, param_of, require_steps, swap_in_quant_lora
from dlqat.methods.calibration import collect_hessians, quantize_block_by_block
from dlqat.methods.registry import QuantMethod, register_method
from dlqat.quant.gptq import gptq_quantize
from dlqat.surgery import name_filter, replace_linears


@dataclass
class RTNConfig(QuantMethodConfig):
    """Round-to-nearest with min/max groups: trains nothing."""

    name: ClassVar[str] = "rtn"


@dataclass
class GPTQConfig(QuantMethodConfig):
    """GPTQ (Frantar et al., 2023) on calibration examples from the training data."""

    name: ClassVar[str] = "gptq"
    calib_samples: int = field(default=128, metadata={"help": "GPTQ calibration examples (from the training data)"})
    damp: float = field(default=0.01, metadata={"help": "GPTQ dampening, fraction of the mean Hessian diagonal"})
    grid: str = field(
        default="minmax",
        metadata={
            "help": "each group's range: minmax (reference GPTQ's default) or mse (its clipping search, mse=True: "
            "the range shrunk to the least squared rounding error; helps most at 2-3 bits)"
        },
    )
    sequential: bool = field(
        default=True,
        metadata={
            "help": "GPTQ block by block on the quantized blocks' outputs (reference GPTQ); false: one float pass"
        },
    )


@dataclass
class FloatLoRAFields:
    """The float LoRA fine-tune that ``lora_rtn`` / ``lora_gptq`` run before quantizing."""

    rank: int = field(default=16, metadata={"help": "LoRA rank"})
    alpha: float = field(default=16.0, metadata={"help": "LoRA alpha"})
    steps: int | None = field(default=None, metadata={"help": "LoRA steps; default 2000 (40 demo)"})
    lr: float = field(default=2e-4, metadata={"help": "LoRA learning rate"})


@dataclass
class LoRARTNConfig(RTNConfig, FloatLoRAFields):
    """Float LoRA fine-tune, merge, then RTN (the two-step pipeline)."""

    name: ClassVar[str] = "lora_rtn"


@dataclass
class LoRAGPTQConfig(GPTQConfig, FloatLoRAFields):
    """Float LoRA fine-tune, merge, then GPTQ."""

    name: ClassVar[str] = "lora_gptq"


class RTN(QuantMethod):
    """RTN, and the base of the other post-training methods: float LoRA first when the config has one."""

    def prepare(self, model: nn.Module, cfg: QuantMethodConfig) -> list[str]:
        """Float LoRA layers (quantizer off) for the ``lora_*`` configs; otherwise just find the targets."""
        if isinstance(cfg, FloatLoRAFields):
            return swap_in_quant_lora(
                model, cfg, rank=cfg.rank, alpha=cfg.alpha, use_magnitude=False, clip_mode=ClipMode.DYNAMIC,
                quantize_enabled=False,
            )  # fmt: skip
        should = name_filter(cfg.target_modules)
        names = [n for n, m in model.named_modules() if n and should(n, m)]
        if not names:
            raise ValueError("no linear layer matched the target filter")
        return names

    def phases(self, cfg: QuantMethodConfig, layer_names: list[str]) -> list[Phase]:
        if not isinstance(cfg, FloatLoRAFields):
            return []
        require_steps(cfg, "steps")
        return [Phase("float lora: lora_a/lora_b", cfg.steps, cfg.lr, param_of("lora_a", "lora_b"))]

    def starts_at(self, cfg: QuantMethodConfig) -> None:
        return None  # the model is float until finalize

    def trains_final_forward(self, cfg: QuantMethodConfig) -> bool:
        return not isinstance(cfg, FloatLoRAFields)  # float + LoRA while training; quantized in finalize

    def finalize(self, model: nn.Module, cfg: QuantMethodConfig, layer_names: list[str], calibration) -> None:
        """Merge a float LoRA if any, then replace the target linears by ``QuantizedLinear``s."""
        if isinstance(cfg, FloatLoRAFields):
            _merge_lora(model)
        self.quantize(model, cfg, layer_names, calibration)

    def quantize(self, model: nn.Module, cfg: QuantMethodConfig, layer_names: list[str], calibration) -> None:
        def rtn(_name: str, linear: nn.Linear) -> QuantizedLinear:
            return QuantizedLinear.round_to_nearest(linear.weight, cfg.n_bits, cfg.group_size, linear.bias)

        wanted = set(layer_names)
        replace_linears(model, rtn, lambda n, _m: n in wanted)


class GPTQ(RTN):
    def quantize(self, model: nn.Module, cfg: GPTQConfig, layer_names: list[str], calibration) -> None:
        # A quantized block runs once per calibration batch to feed the next one: its layers keep their
        # unpacked weight until the next block is quantized (unpacking per batch dominated the run time).
        unpacked: list[QuantizedLinear] = []

        def release() -> None:
            for layer in unpacked:
                layer.hold_unpacked(False)
            unpacked.clear()

        def gptq_layers(names: list[str], hessians: dict[str, torch.Tensor]) -> None:
            release()

            def make(name: str, linear: nn.Linear) -> QuantizedLinear:
                w = linear.weight.detach().float()
                q, scale, offset = gptq_quantize(
                    w, hessians.pop(name), cfg.n_bits, cfg.group_size, cfg.damp, grid=cfg.grid
                )
                layer = QuantizedLinear.from_codes(q, scale, offset, cfg.n_bits, cfg.group_size, linear.bias)
                layer.hold_unpacked(True)
                unpacked.append(layer)
                return layer

            wanted = set(names)
            replace_linears(model, make, lambda n, _m: n in wanted)

        batches = calibration[: cfg.calib_samples]
        try:
            if cfg.sequential:
                quantize_block_by_block(model, layer_names, batches, gptq_layers)
            else:
                gptq_layers(layer_names, collect_hessians(model, layer_names, batches))
        finally:
            release()


for _config, _handler in ((RTNConfig, RTN), (LoRARTNConfig, RTN), (GPTQConfig, GPTQ), (LoRAGPTQConfig, GPTQ)):
    register_method(_config)(_handler)


def _merge_lora(model: nn.Module) -> None:
    def make(_name: str, layer: QuantLoRALinear) -> nn.Linear:
        linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        linear.weight = nn.Parameter(layer.merged_weight().detach(), requires_grad=False)
        linear.bias = layer.bias
        return linear

    replace_linears(model, make, lambda _n, m: isinstance(m, QuantLoRALinear))
