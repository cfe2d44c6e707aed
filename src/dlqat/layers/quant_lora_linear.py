"""The quantization-aware LoRA linear: ``y = x @ (m * Q(W0 + scaling * B @ A))^T + bias``.

The adapter lives *inside* the quantizer (never a float side branch), so what is trained is exactly
the low-bit weight that ships.
"""

from __future__ import annotations

from enum import Enum

import torch
import torch.nn.functional as F
from torch import nn

from dlqat.layers.act_quant import ActQuant
from dlqat.quant import (
    FLOAT,
    Storage,
    apply_magnitude,
    fake_quantize,
    integer_offset,
    merge_lora,
    minmax_scale_offset,
    mse_scale_offset,
    n_groups,
    quantize,
)
from dlqat.quant.lean_linear import lean_qlora_linear


class ClipMode(str, Enum):
    """Where the clipping range (scale, offset) comes from (DL-QAT paper, Table 3)."""

    DYNAMIC = "dynamic"  # min/max of the current merged weight every step, never trained
    LEARN_THEN_FIX = "learn_then_fix"  # DL-QAT: trained alone in phase 1, frozen in phase 2
    JOINT = "joint"  # trained together with A, B (and m) in phase 2 (L4Q-style)


# Where scale/offset start: min/max (the untrained layer is RTN) or the clipping search of
# ``mse_scale_offset`` (the untrained layer is RTN with MSE-searched ranges).
INITS = ("minmax", "mse")


class QuantLoRALinear(ActQuant, nn.Module):
    """Frozen ``W0`` (shared with the source ``nn.Linear``), LoRA ``A``/``B``, ``scale``/``offset``
    per group, and DL-QAT's per-group magnitude ``m``.

    Shapes: ``weight (out, in)``, ``lora_a (rank, in)``, ``lora_b (out, rank)``,
    ``scale``/``offset``/``magnitude`` ``(out, n_groups)``.
    """

    # True inside ``dlqat.losses.float_teacher``: compute with the frozen W0 alone (the float model)
    float_forward = False

    def __init__(
        self,
        weight: nn.Parameter,
        bias: nn.Parameter | None,
        n_bits: int,
        group_size: int,
        rank: int,
        alpha: float,
        use_magnitude: bool = True,
        clip_mode: ClipMode | str = ClipMode.LEARN_THEN_FIX,
        init: str = "minmax",
        storage: Storage = FLOAT,
    ) -> None:
        super().__init__()
        if init not in INITS:
            raise ValueError(f"init={init!r}: expected one of {', '.join(INITS)}")
        out_features, in_features = weight.shape
        self.in_features, self.out_features = in_features, out_features
        self.n_bits, self.group_size = n_bits, group_size
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        self.clip_mode = ClipMode(clip_mode)
        self.quantize_enabled = True
        self.storage = storage  # how the export stores scale/offset (dtype, integer zero point)
        # Lean: save only x and small tensors for backward (same outputs and gradients as autograd).
        self.lean = True
        weight.requires_grad_(False)
        self.weight, self.bias = weight, bias  # shared with the source linear, not copied
        if bias is not None:
            bias.requires_grad_(False)
        factory = {"device": weight.device, "dtype": weight.dtype}
        # PEFT's "gaussian" init for A; B = 0 so the layer starts exactly at RTN(W0).
        self.lora_a = nn.Parameter(torch.randn(rank, in_features, **factory) / rank)
        self.lora_b = nn.Parameter(torch.zeros(out_features, rank, **factory))
        groups = (out_features, n_groups(in_features, group_size))
        self.magnitude = nn.Parameter(torch.ones(groups, **factory)) if use_magnitude else None
        if self.clip_mode is ClipMode.DYNAMIC:
            self.scale = self.offset = None
        else:
            scale, offset = self._minmax(weight) if init == "minmax" else self._mse(weight)
            self.scale, self.offset = nn.Parameter(scale), nn.Parameter(offset)

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs) -> QuantLoRALinear:
        return cls(linear.weight, linear.bias, **kwargs)

    def _minmax(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if w.device.type == "meta":
            shape = (self.out_features, n_groups(self.in_features, self.group_size))
            return torch.empty(shape, device="meta", dtype=w.dtype), torch.empty(shape, device="meta", dtype=w.dtype)
        with torch.no_grad():
            return minmax_scale_offset(w.detach(), self.n_bits, self.group_size)

    def _mse(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if w.device.type == "meta":
            return self._minmax(w)
        with torch.no_grad():
            return mse_scale_offset(w.detach(), self.n_bits, self.group_size)

    def merged_weight(self) -> torch.Tensor:
        """``W0 + scaling * B @ A``, ``(out, in)``."""
        return merge_lora(self.weight, self.lora_a, self.lora_b, self.scaling)

    def scale_offset(self, merged: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The clipping range the codes come from (with ``storage.int_zero``: an integer zero point)."""
        if self.clip_mode is ClipMode.DYNAMIC:
            with torch.no_grad():
                scale, offset = self._minmax(merged)
        else:
            scale, offset = self.scale, self.offset
        if self.storage.int_zero:
            offset = integer_offset(scale, offset, self.n_bits)
        return scale, offset

    def quantized_weight(self) -> torch.Tensor:
        """The float weight this layer computes with (``m * Q(W0 + sBA)``, or unquantized when off)."""
        merged = self.merged_weight()
        if not self.quantize_enabled:
            return merged
        scale, offset = self.scale_offset(merged)
        return fake_quantize(merged, scale, offset, self.n_bits, self.group_size, self.magnitude, self.storage)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.float_forward:
            return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        return self.quantize_output(self._linear(self.quantize_input(x)))

    def _linear(self, x: torch.Tensor) -> torch.Tensor:
        if self.lean and self.quantize_enabled:
            merged = self.merged_weight().detach() if self.clip_mode is ClipMode.DYNAMIC else None
            scale, offset = self.scale_offset(merged)
            return lean_qlora_linear(
                x, self.weight, self.lora_a, self.lora_b, scale, offset, self.magnitude, self.bias, self.scaling,
                self.n_bits, self.group_size, self.storage,
            )  # fmt: skip
        w = self.quantized_weight()
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, w.to(x.dtype), bias)

    @torch.no_grad()
    def to_codes(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Final weight as integer codes ``q`` (int8, ``(out, in)``) and the per-group ``scale``
        and ``offset`` with the magnitude folded in: ``W = scale * q + offset``."""
        merged = self.merged_weight()
        scale, offset = self.scale_offset(merged)
        q = quantize(merged, scale, offset, self.n_bits, self.group_size)
        scale, offset = apply_magnitude(scale, offset, self.magnitude, self.storage)
        return q.to(torch.int8), scale, offset

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, n_bits={self.n_bits}, "
            f"group_size={self.group_size}, rank={self.rank}, scaling={self.scaling:g}, "
            f"magnitude={self.magnitude is not None}, clip_mode={self.clip_mode.value}"
        )


__all__ = ["INITS", "ClipMode", "QuantLoRALinear"]
