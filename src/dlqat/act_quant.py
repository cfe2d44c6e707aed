"""Switch W4A8KV8-style activation and KV fake quantization on a model, for training and evaluation.

Activations: the input of every quantized linear. KV: the outputs of the ``k_proj``/``v_proj``
linears, i.e. what the cache stores (keys before rotary embedding, which acts within each token).
"""

from __future__ import annotations

from torch import nn
from torch.utils.hooks import RemovableHandle

from dlqat.layers import QuantizedLinear, QuantLoRALinear
from dlqat.layers.qa_lora_linear import QALoRALinear
from dlqat.quant.act_quant import fake_quantize_per_token

_QUANT_LAYERS = (QuantLoRALinear, QALoRALinear, QuantizedLinear)
KV_PROJECTIONS = ("k_proj", "v_proj")


def install_act_quant(
    model: nn.Module, act_bits: int | None = None, kv_bits: int | None = None
) -> list[RemovableHandle]:
    """Add the hooks; returns their handles (``handle.remove()`` switches them off)."""
    handles = []
    for name, module in model.named_modules():
        if act_bits is not None and isinstance(module, (*_QUANT_LAYERS, nn.Linear)) and _is_quantized(module):
            handles.append(
                module.register_forward_pre_hook(
                    lambda m, args: args if getattr(m, "float_forward", False) else (fake_quantize_per_token(args[0], act_bits), *args[1:])
                )
            )
        if kv_bits is not None and name.rsplit(".", 1)[-1] in KV_PROJECTIONS:
            handles.append(module.register_forward_hook(
                    lambda m, _args, out: out if getattr(m, "float_forward", False) else fake_quantize_per_token(out, kv_bits)
                ))
    if (act_bits is not None or kv_bits is not None) and not handles:
        raise ValueError("act_bits/kv_bits given but the model has no quantized linear or k_proj/v_proj to hook")
    return handles


def _is_quantized(module: nn.Module) -> bool:
    return isinstance(module, _QUANT_LAYERS)
