"""Thin nn.Modules over the quantizer math."""

from dlqat.layers.quant_lora_linear import ClipMode, QuantLoRALinear
from dlqat.layers.quantized_linear import QuantizedEmbedding, QuantizedLinear

__all__ = ["ClipMode", "QuantLoRALinear", "QuantizedEmbedding", "QuantizedLinear"]
