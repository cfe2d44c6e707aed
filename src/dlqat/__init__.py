"""dlqat: quantization-aware low-rank fine-tuning that hands back a real low-bit model."""

from dlqat.export import convert, hf_quantizer, load_quantized, save_quantized  # noqa: F401 (registers "dlqat")
from dlqat.layers import ClipMode, QuantizedLinear, QuantLoRALinear
from dlqat.methods.dl_qat import DLQATConfig, prepare

__version__ = "0.1.0"

load = load_quantized

__all__ = [
    "ClipMode",
    "DLQATConfig",
    "QuantLoRALinear",
    "QuantizedLinear",
    "convert",
    "load",
    "load_quantized",
    "prepare",
    "save_quantized",
]
