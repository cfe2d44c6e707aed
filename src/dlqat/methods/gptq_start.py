"""A QAT start from GPTQ: the untrained quantized LoRA layers compute GPTQ's model exactly.

GPTQ rounds column by column, pushing each column's rounding error onto the columns not yet rounded.
For every target ``QuantLoRALinear`` (block by block, each block calibrated on the outputs of the
blocks before it as quantized, as reference GPTQ) the frozen base ``W0`` becomes GPTQ's updated weight
(each column as it was when rounded) and ``scale``/``offset`` GPTQ's: with ``B = 0`` and ``m = 1``
the layer's codes are GPTQ's codes. Training then moves the adapters from there; the updated weight
keeps the sub-step position of every weight, so small updates flip the codes nearest a boundary first.
Measured (README): worse than the MSE start at W3 g128 (40 steps); at W2 g64 GPTQ with its clipping
search (``gptq-mse``) trains 3x better than min/max GPTQ, so it is DL-QAT's default start at 2 bits.

The original float weight is gone from these layers, so the layers cannot be their own distillation
teacher: ``kd`` then keeps a frozen float copy of the model (``dlqat.train``), or uses ``--teacher``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from dlqat.layers.weight_quantizer import GPTQ_INITS
from dlqat.methods.calibration import quantize_block_by_block
from dlqat.quant.gptq import gptq_with_updates

GPTQ_START_SAMPLES = 128  # calibration examples for a GPTQ start (the GPTQ baseline's default)


class GPTQStart:
    """Handler steps of a method whose ``cfg.resolved_init`` may name a GPTQ start (DL-QAT, L4Q)."""

    def calibrate(self, model: nn.Module, cfg, layer_names: list[str], calibration: Sequence[torch.Tensor]) -> None:
        grid = GPTQ_INITS.get(cfg.resolved_init)  # the GPTQ group range a GPTQ start asks for; None for the others
        if grid:
            gptq_start(model, layer_names, calibration[:GPTQ_START_SAMPLES], grid=grid)

    def float_teacher(self, cfg) -> bool:
        return cfg.resolved_init not in GPTQ_INITS  # a GPTQ start replaces W0 by GPTQ's updated weight

    def calibrated_state(self, model: nn.Module, cfg, layer_names: list[str]) -> dict[str, torch.Tensor]:
        if cfg.resolved_init not in GPTQ_INITS:
            return {}
        state = {}
        for name in layer_names:
            layer = model.get_submodule(name)
            for key, tensor in (("weight", layer.weight), ("quantizer.scale", layer.scale),
                                ("quantizer.offset", layer.offset)):  # fmt: skip
                state[f"{name}.{key}"] = tensor
        return state

    @torch.no_grad()
    def load_calibrated(self, model: nn.Module, cfg, layer_names: list[str], state: dict[str, torch.Tensor]) -> None:
        for key, tensor in self.calibrated_state(model, cfg, layer_names).items():
            tensor.copy_(state[key].to(tensor.device, tensor.dtype))


@torch.no_grad()
def gptq_start(
    model: nn.Module, names: list[str], batches: list[torch.Tensor], damp: float = 0.01, grid: str = "minmax"
) -> None:
    """Replace ``W0``, ``scale``, ``offset`` of the named ``QuantLoRALinear`` layers by GPTQ's."""
    layers = {name: model.get_submodule(name) for name in names}
    for layer in layers.values():  # a block calibrates on float layers of its own, quantized ones before it
        layer.quantize_enabled = False

    def start(block: list[str], hessians: dict[str, torch.Tensor]) -> None:
        for name in block:
            layer, quantizer = layers[name], layers[name].quantizer
            _, scale, offset, updated = gptq_with_updates(
                layer.weight, hessians.pop(name), quantizer.n_bits, quantizer.group_size, damp, grid=grid
            )
            layer.weight.copy_(updated.to(layer.weight.dtype))
            quantizer.scale.copy_(scale.to(quantizer.scale.dtype))
            quantizer.offset.copy_(offset.to(quantizer.offset.dtype))
            layer.quantize_enabled = True

    quantize_block_by_block(model, names, batches, start)
