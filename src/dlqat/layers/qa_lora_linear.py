"""QA-LoRA (Xu et al., 2023): LoRA on the group-average-pooled input, mergeable into the offsets.

``y = x @ Wq^T + scaling * B @ A @ pool(x)`` with ``Wq = scale * q + offset`` the frozen RTN weight,
``pool(x)_j`` the mean of ``x`` over the columns of group ``j`` and ``A`` of shape
``(rank, n_groups)``. Since ``B A pool(x) = sum_i x_i (B A)[:, group(i)] / size(group(i))``, the
adapter is a per-group constant added to the weight, i.e. to ``offset``: after training the layer is
an ordinary group-quantized weight with the same codes.

The frozen codes start as RTN (min/max); ``keep_float=True`` also keeps the float weight (not saved)
until ``set_codes`` replaces the codes by a calibrated quantizer's (GPTQ, the QA-LoRA paper's base).
Until then the layer computes RTN, or, with ``in_float`` set (during calibration: layers not yet
quantized compute in float, as in reference GPTQ), the float weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dlqat.layers.act_quant import ActQuant
from dlqat.quant import dequantize, minmax_scale_offset, n_groups, quantize, resolve_group_size
from dlqat.quant.primitives import to_groups


class QALoRALinear(ActQuant, nn.Module):
    def __init__(
        self, linear: nn.Linear, n_bits: int, group_size: int, rank: int, alpha: float, keep_float: bool = False
    ) -> None:
        super().__init__()
        out_features, in_features = linear.weight.shape
        self.in_features, self.out_features = in_features, out_features
        self.n_bits, self.group_size, self.rank, self.scaling = n_bits, group_size, rank, alpha / rank
        groups = n_groups(in_features, group_size)
        with torch.no_grad():
            scale, offset = minmax_scale_offset(linear.weight.detach(), n_bits, group_size)
            q = quantize(linear.weight.detach(), scale, offset, n_bits, group_size)
        self.register_buffer("q", q.to(torch.int8))
        self.register_buffer("scale", scale)
        self.register_buffer("offset", offset)
        # the float weight a calibrated base is computed from (moves with the layer, never saved)
        self.register_buffer("float_weight", linear.weight.detach() if keep_float else None, persistent=False)
        self.in_float = False
        self.bias = linear.bias
        if self.bias is not None:
            self.bias.requires_grad_(False)
        g = resolve_group_size(group_size, in_features)
        sizes = torch.full((groups,), float(g))
        sizes[-1] = in_features - g * (groups - 1)
        self.register_buffer("group_sizes", sizes.to(linear.weight.dtype))
        factory = {"device": linear.weight.device, "dtype": linear.weight.dtype}
        self.lora_a = nn.Parameter(torch.randn(rank, groups, **factory) / rank)
        self.lora_b = nn.Parameter(torch.zeros(out_features, rank, **factory))

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """Mean of ``x`` over each group's columns: ``(..., in) -> (..., n_groups)``."""
        return to_groups(x, self.group_size, pad_value=0.0).sum(-1) / self.group_sizes.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quantize_output(self._linear(self.quantize_input(x)))

    def _linear(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if self.in_float:  # being calibrated: float, as reference GPTQ's not-yet-quantized layers
            return F.linear(x, self.float_weight.to(x.dtype), bias)
        w = dequantize(self.q.to(self.scale.dtype), self.scale, self.offset, self.group_size)
        base = F.linear(x, w.to(x.dtype), bias)
        return base + self.scaling * F.linear(F.linear(self.pool(x), self.lora_a.to(x.dtype)), self.lora_b.to(x.dtype))

    @torch.no_grad()
    def set_codes(self, q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> None:
        """Replace the frozen base by a calibrated one (same shapes) and drop the float weight."""
        for name, value in (("q", q), ("scale", scale), ("offset", offset)):
            current = getattr(self, name)
            if value.shape != current.shape:
                raise ValueError(f"set_codes: {name} of shape {tuple(value.shape)}, expected {tuple(current.shape)}")
            current.copy_(value.to(current.dtype))
        self.float_weight, self.in_float = None, False

    @torch.no_grad()
    def to_codes(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The merged layer: same codes and scales, offsets absorb the adapter."""
        delta = self.scaling * (self.lora_b @ self.lora_a) / self.group_sizes  # (out, n_groups)
        return self.q, self.scale, self.offset + delta
