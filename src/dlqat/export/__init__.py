"""Export: finished low-bit models, saved and loaded."""

from dlqat.export.quantized import convert, load_quantized, quantized_layers, save_quantized

__all__ = ["convert", "load_quantized", "quantized_layers", "save_quantized"]
