"""The quantization-aware LoRA linear: ``y = x @ (m * Q(W0 + scaling * B @ A))^T + bias``.

The adapter lives *inside* the quantizer (never a float side branch), so what is trained is exactly
the low-bit weight that ships.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dlqat.layers.act_quant import ActQuant
from dlqat.layers.weight_quantizer import INITS, ClipMode, WeightQuantizer
from dlqat.quant import FLOAT, Storage, merge_lora
from dlqat.quant.lean_linear import lean_qlora_linear


class QuantLoRALinear(ActQuant, nn.Module):
    """Frozen ``W0`` (shared with the source ``nn.Linear``), LoRA ``A``/``B``, and a ``WeightQuantizer``
    (``quantizer``: scale/offset per group, DL-QAT's magnitude ``m``, clip mode, storage).

    Shapes: ``weight (out, in)``, ``lora_a (rank, in)``, ``lora_b (out, rank)``,
    ``quantizer.scale``/``offset``/``magnitude``/``shift`` ``(out, n_groups)`` (also readable as ``self.scale`` ...).
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
        use_shift: bool = False,
    ) -> None:
        super().__init__()
        out_features, in_features = weight.shape
        self.in_features, self.out_features = in_features, out_features
        self.n_bits, self.group_size = n_bits, group_size
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        self.quantize_enabled = True
        # Lean: save only x and small tensors for backward (same outputs and gradients as autograd).
        self.lean = True
        weight.requires_grad_(False)
        self.weight, self.bias = weight, bias  # shared with the source linear, not copied
        if bias is not None:
            bias.requires_grad_(False)
        factory = {"device": weight.device, "dtype": weight.dtype}
        # PEFT's "gaussian" init for A; B = 0 so the layer starts exactly at the quantizer's RTN(W0).
        self.lora_a = nn.Parameter(torch.randn(rank, in_features, **factory) / rank)
        self.lora_b = nn.Parameter(torch.zeros(out_features, rank, **factory))
        self.quantizer = WeightQuantizer(weight, n_bits, group_size, use_magnitude, clip_mode, init, storage, use_shift)

    # The quantizer's state, readable where the layer is used as a whole (tests, exports, benches).
    scale = property(lambda self: self.quantizer.scale)
    offset = property(lambda self: self.quantizer.offset)
    magnitude = property(lambda self: self.quantizer.magnitude)
    shift = property(lambda self: self.quantizer.shift)
    clip_mode = property(lambda self: self.quantizer.clip_mode)
    storage = property(lambda self: self.quantizer.storage)

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs) -> QuantLoRALinear:
        return cls(linear.weight, linear.bias, **kwargs)

    def merged_weight(self) -> torch.Tensor:
        """``W0 + scaling * B @ A``, ``(out, in)``."""
        return merge_lora(self.weight, self.lora_a, self.lora_b, self.scaling)

    def quantized_weight(self) -> torch.Tensor:
        """The float weight this layer computes with (``m * Q(W0 + sBA)``, or unquantized when off)."""
        merged = self.merged_weight()
        return self.quantizer.fake_quantize(merged) if self.quantize_enabled else merged

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.float_forward:
            return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        return self.quantize_output(self._linear(self.quantize_input(x)))

    def _linear(self, x: torch.Tensor) -> torch.Tensor:
        if self.lean and self.quantize_enabled:
            merged = self.merged_weight().detach() if self.clip_mode is ClipMode.DYNAMIC else None
            scale, offset = self.quantizer.range(merged)
            return lean_qlora_linear(
                x, self.weight, self.lora_a, self.lora_b, scale, offset, self.magnitude, self.bias, self.scaling,
                self.n_bits, self.group_size, self.storage, self.shift,
            )  # fmt: skip
        w = self.quantized_weight()
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, w.to(x.dtype), bias)

    @torch.no_grad()
    def to_codes(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Final weight as integer codes ``q`` (int8, ``(out, in)``) and the per-group ``scale``
        and ``offset`` with the magnitude folded in: ``W = scale * q + offset``."""
        return self.quantizer.codes(self.merged_weight())

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, n_bits={self.n_bits}, "
            f"group_size={self.group_size}, rank={self.rank}, scaling={self.scaling:g}"
        )


__all__ = ["INITS", "ClipMode", "QuantLoRALinear", "WeightQuantizer"]
