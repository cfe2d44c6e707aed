"""One module per method: a config dataclass and a ``QuantMethod`` handler registered for it.

``dlqat.prepare(model, cfg)`` and the rest dispatch on the config's class (``registry.handler``);
importing this package registers the built-in methods.
"""

from __future__ import annotations

from dlqat.methods import dl_qat, full_qat, l4q, ptq, qa_lora  # noqa: F401 (registers the methods)
from dlqat.methods.base import Phase, QuantMethodConfig, count_parameters, set_trainable
from dlqat.methods.dl_qat import PRESETS, DLQATConfig
from dlqat.methods.full_qat import FullQATConfig
from dlqat.methods.l4q import L4QConfig
from dlqat.methods.ptq import GPTQConfig, LoRAGPTQConfig, LoRARTNConfig, RTNConfig
from dlqat.methods.qa_lora import QALoRAConfig
from dlqat.methods.registry import QuantMethod, config_class, handler, method_configs, method_names, register_method


def make_config(method: str, **values) -> QuantMethodConfig:
    """The config of the method named ``method`` (its CLI name) with ``values``."""
    return config_class(method)(**values)


__all__ = [
    "PRESETS",
    "DLQATConfig",
    "FullQATConfig",
    "GPTQConfig",
    "L4QConfig",
    "LoRAGPTQConfig",
    "LoRARTNConfig",
    "Phase",
    "QALoRAConfig",
    "QuantMethod",
    "QuantMethodConfig",
    "RTNConfig",
    "config_class",
    "count_parameters",
    "handler",
    "make_config",
    "method_configs",
    "method_names",
    "register_method",
    "set_trainable",
]
