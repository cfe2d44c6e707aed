"""Export: finished low-bit models, saved and loaded."""

from dlqat.export.quantized import convert, load_quantized, save_quantized

__all__ = ["convert", "load_quantized", "save_quantized"]
