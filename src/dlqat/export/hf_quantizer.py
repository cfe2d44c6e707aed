"""``AutoModelForCausalLM.from_pretrained(folder)`` for dlqat folders, after ``import dlqat``.

A dlqat folder's ``config.json`` carries ``quantization_config = {"quant_method": "dlqat", ...}``
(the same layer specs as ``dlqat_quant.json``). This registers that method with transformers'
quantizer registry, as out-of-tree quantizers do: before the weights load, the model skeleton gets
empty ``QuantizedLinear``/``QuantizedEmbedding`` modules, and the packed tensors then load by name.
Without dlqat imported, transformers says it does not know the method ``dlqat``.
"""

from __future__ import annotations

from typing import Any

from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from dlqat.export.quantized import FORMAT, build_skeleton

METHOD = "dlqat"


@register_quantization_config(METHOD)
class DlqatQuantConfig(QuantizationConfigMixin):
    """Which layers are packed at which bits/group size; pre-quantized folders only."""

    def __init__(
        self, layers: dict[str, dict], embedding: dict | None = None, format: str = FORMAT, **kwargs: Any
    ) -> None:
        if format != FORMAT:
            raise ValueError(f"quantization_config.format={format!r}: this dlqat reads {FORMAT!r}")
        self.quant_method = METHOD
        self.format, self.layers, self.embedding = format, layers, embedding


@register_quantizer(METHOD)
class DlqatHfQuantizer(HfQuantizer):
    requires_calibration = True  # codes come from dlqat training/export, never from loading a float model

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        pass

    def param_needs_quantization(self, model, param_name: str, **kwargs: Any) -> bool:
        return False  # every packed tensor is stored as it is used

    def _process_model_before_weight_loading(self, model, **kwargs: Any):
        build_skeleton(model, self.quantization_config.layers, self.quantization_config.embedding)
        return model

    def is_serializable(self) -> bool:
        return False  # save with dlqat.save_quantized, which writes dlqat_quant.json too

    @property
    def is_trainable(self) -> bool:
        return False
