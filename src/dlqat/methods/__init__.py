"""One module per method: a Config, ``prepare(model, cfg)`` and ``phases(cfg)``."""

from dlqat.methods.base import Phase, count_parameters, set_trainable
from dlqat.methods.dl_qat import DLQATConfig

__all__ = ["DLQATConfig", "Phase", "count_parameters", "set_trainable"]
