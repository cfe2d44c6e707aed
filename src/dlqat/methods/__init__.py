"""One module per method: a Config, ``prepare``, ``phases`` (and ``finalize`` for post-training steps).

``METHODS`` maps the CLI's ``--method`` names to (module, config class, fixed config values).
"""

from __future__ import annotations

from types import ModuleType

from dlqat.methods import dl_qat, full_qat, l4q, ptq, qa_lora
from dlqat.methods.base import Phase, QuantMethodConfig, count_parameters, set_trainable
from dlqat.methods.dl_qat import DLQATConfig
from dlqat.methods.full_qat import FullQATConfig
from dlqat.methods.l4q import L4QConfig
from dlqat.methods.ptq import PTQConfig
from dlqat.methods.qa_lora import QALoRAConfig

METHODS: dict[str, tuple[ModuleType, type, dict]] = {
    "dl_qat": (dl_qat, DLQATConfig, {}),
    "l4q": (l4q, L4QConfig, {}),
    "qa_lora": (qa_lora, QALoRAConfig, {}),
    "full_qat": (full_qat, FullQATConfig, {}),
    "rtn": (ptq, PTQConfig, {"algorithm": "rtn", "lora_first": False}),
    "gptq": (ptq, PTQConfig, {"algorithm": "gptq", "lora_first": False}),
    "lora_rtn": (ptq, PTQConfig, {"algorithm": "rtn", "lora_first": True}),
    "lora_gptq": (ptq, PTQConfig, {"algorithm": "gptq", "lora_first": True}),
}


def make_config(method: str, **values) -> QuantMethodConfig:
    """The config of ``method`` with its fixed values applied (e.g. ``gptq`` -> ``algorithm="gptq"``)."""
    if method not in METHODS:
        raise ValueError(f"method={method!r}: expected one of {sorted(METHODS)}")
    _, config_cls, fixed = METHODS[method]
    cfg = config_cls(**{**values, **fixed})
    cfg.method_name = method
    return cfg


def method_module(cfg: QuantMethodConfig) -> ModuleType:
    return METHODS[method_name(cfg)][0]


def method_name(cfg: QuantMethodConfig) -> str:
    return getattr(cfg, "method_name", cfg.method)


__all__ = [
    "DLQATConfig",
    "FullQATConfig",
    "L4QConfig",
    "METHODS",
    "PTQConfig",
    "Phase",
    "QALoRAConfig",
    "QuantMethodConfig",
    "count_parameters",
    "make_config",
    "method_module",
    "method_name",
    "set_trainable",
]
