"""Thin nn.Modules over the quantizer math."""

from dlqat.layers.act_quant import ActQuant, set_act_quant
from dlqat.layers.quant_lora_linear import ClipMode, QuantLoRALinear
from dlqat.layers.quantized_linear import QuantizedEmbedding, QuantizedLinear

__all__ = ["ActQuant", "ClipMode", "QuantLoRALinear", "QuantizedEmbedding", "QuantizedLinear", "set_act_quant"]
