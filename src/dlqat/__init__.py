"""dlqat: quantization-aware low-rank fine-tuning that hands back a real low-bit model.

Python API (every method, dispatched on its config's class): ``prepare``, ``phases``, ``finalize``,
``convert``, ``save_quantized``/``load``, and ``fit`` for the whole run (what ``dlqat train`` runs).
"""

from dlqat.api import finalize, phases, prepare
from dlqat.export import convert, hf_quantizer, load_quantized, save_quantized  # noqa: F401 (registers "dlqat")
from dlqat.layers import ClipMode, QuantizedLinear, QuantLoRALinear, set_act_quant
from dlqat.methods import (
    PRESETS,
    DLQATConfig,
    FullQATConfig,
    GPTQConfig,
    L4QConfig,
    LoRAGPTQConfig,
    LoRARTNConfig,
    QALoRAConfig,
    QuantMethod,
    QuantMethodConfig,
    RTNConfig,
    register_method,
)
from dlqat.train import fit
from dlqat.train_config import TrainConfig

__version__ = "0.1.0"

load = load_quantized

__all__ = [
    "PRESETS",
    "ClipMode",
    "DLQATConfig",
    "FullQATConfig",
    "GPTQConfig",
    "L4QConfig",
    "LoRAGPTQConfig",
    "LoRARTNConfig",
    "QALoRAConfig",
    "QuantLoRALinear",
    "QuantMethod",
    "QuantMethodConfig",
    "QuantizedLinear",
    "RTNConfig",
    "TrainConfig",
    "convert",
    "finalize",
    "fit",
    "load",
    "load_quantized",
    "phases",
    "prepare",
    "register_method",
    "save_quantized",
    "set_act_quant",
]
