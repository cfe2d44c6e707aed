"""dlqat: quantization-aware low-rank fine-tuning that hands back a real low-bit model.

Python API (every method, dispatched on its config's class): ``prepare``, ``calibrate``, ``phases``,
``finalize``, ``convert``, ``save_quantized``/``load``, and ``fit`` for the whole run (what ``dlqat train`` runs).
"""

import logging as _logging

# torchao (the [torchao] extra), which transformers imports when it is installed, logs every CUDA kernel
# library it cannot load on a CPU-only machine, and torch warns about its enum registrations: noise on
# every command, silenced for this one import.
_noisy = {name: _logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")}
_levels = {name: logger.level for name, logger in _noisy.items()}
for _logger in _noisy.values():
    _logger.setLevel(_logging.ERROR)
try:
    import transformers.modeling_utils  # noqa: F401 (transformers imports torchao, when installed, here)
finally:
    for _name, _logger in _noisy.items():
        _logger.setLevel(_levels[_name])

from dlqat.api import calibrate, finalize, phases, prepare
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
    "calibrate",
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
