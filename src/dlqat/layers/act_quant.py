"""W4A8KV8-style activation and KV fake quantization as attributes of the quantized layers.

Being layer state (not run-level hooks), it survives ``convert`` (the runtime ``QuantizedLinear`` gets
the same attributes) and is saved in ``dlqat_quant.json``, so a reloaded model quantizes as trained.

``act_bits``: the layer's input, per token (symmetric absmax). ``out_bits`` with ``out_group``: the
layer's output per token and per group of ``out_group`` features; ``set_act_quant`` gives the
``k_proj``/``v_proj`` layers ``out_bits = kv_bits`` and ``out_group = head_dim``, i.e. one scale per
token *and head*, as an int8 KV cache stores them. Keys are quantized as the projection emits them,
before rotary embedding (the "pre-RoPE" choice of KVQuant, Hooper et al. 2024: channel outliers are
not yet smeared across the rotated pairs); a cache that stores post-RoPE keys differs by that rotation.
"""

from __future__ import annotations

import torch
from torch import nn

from dlqat.quant.act_quant import fake_quantize_per_token
from dlqat.quant.primitives import check_bits

KV_PROJECTIONS = ("k_proj", "v_proj")


class ActQuant:
    """Mixin for the quantized layers: optional fake quantization of input and output."""

    act_bits: int | None = None
    out_bits: int | None = None
    out_group: int | None = None

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.act_bits is None else fake_quantize_per_token(x, self.act_bits)

    def quantize_output(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.out_bits is None else fake_quantize_per_token(y, self.out_bits, self.out_group)

    def act_quant_spec(self) -> dict:
        """What ``dlqat_quant.json`` records (only the settings in use)."""
        spec = {"act_bits": self.act_bits, "out_bits": self.out_bits, "out_group": self.out_group}
        return {k: v for k, v in spec.items() if v is not None}

    def set_act_quant_spec(self, spec: dict) -> None:
        for key in ("act_bits", "out_bits", "out_group"):
            setattr(self, key, spec.get(key))


def set_act_quant(model: nn.Module, act_bits: int | None = None, kv_bits: int | None = None) -> int:
    """Set (or, with ``None``, clear) activation/KV quantization on every quantized layer; returns how
    many layers quantize something."""
    for bits in (act_bits, kv_bits):
        if bits is not None:
            check_bits(bits)
    head_dim = _head_dim(model)
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, ActQuant)]
    kv_layers = [m for n, m in layers if n.rsplit(".", 1)[-1] in KV_PROJECTIONS]
    if kv_bits is not None and not kv_layers:
        raise ValueError("kv_bits: no quantized k_proj/v_proj layer to quantize the output of (check target_modules)")
    if act_bits is not None and not layers:
        raise ValueError("act_bits: the model has no quantized linear layer")
    for _, layer in layers:
        layer.act_bits, layer.out_bits, layer.out_group = act_bits, None, None
    for layer in kv_layers:
        layer.out_bits, layer.out_group = kv_bits, (head_dim if kv_bits is not None else None)
    return sum(1 for _, m in layers if m.act_bits is not None or m.out_bits is not None)


def _head_dim(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    if config is None:
        return None
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
