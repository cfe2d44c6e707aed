"""Runtime linear for a finished low-bit weight ``W = scale * q + offset`` (per group)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dlqat.quant import dequantize, n_groups


class QuantizedLinear(nn.Module):
    """Holds integer codes and per-group scale/offset as buffers; no trainable state.

    Buffers: ``qweight`` int8 ``(out, in)`` signed codes, ``scale``/``offset`` ``(out, n_groups)``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        n_bits: int,
        group_size: int,
        bias: bool = False,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.n_bits, self.group_size = n_bits, group_size
        groups = (out_features, n_groups(in_features, group_size))
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.ones(groups, dtype=dtype, device=device))
        self.register_buffer("offset", torch.zeros(groups, dtype=dtype, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)

    @classmethod
    def from_codes(
        cls,
        q: torch.Tensor,
        scale: torch.Tensor,
        offset: torch.Tensor,
        n_bits: int,
        group_size: int,
        bias: torch.Tensor | None = None,
    ) -> "QuantizedLinear":
        layer = cls(q.shape[1], q.shape[0], n_bits, group_size, bias is not None, scale.dtype, "meta")
        layer.qweight, layer.scale, layer.offset = q.to(torch.int8), scale.detach(), offset.detach()
        layer.bias = None if bias is None else bias.detach()
        return layer

    def dequantized_weight(self) -> torch.Tensor:
        return dequantize(self.qweight.to(self.scale.dtype), self.scale, self.offset, self.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight().to(x.dtype), bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, n_bits={self.n_bits}, group_size={self.group_size}"
