"""PyTorch's int4 weight-only matmul kernels (CPU: ``_weight_int4pack_mm_for_cpu``, CUDA: tinygemm
``_weight_int4pack_mm``) driven with dlqat's ``scale * q + offset`` groups.

Both kernels compute ``W = (u - 8) * scale + zero`` per group from unsigned 4-bit ``u``. Our signed
codes ``q`` (2, 3 or 4 bits: all inside ``[-8, 7]``) are stored as ``u = q + 8``, so ``zero = offset``
and 3/2-bit weights run in the 4-bit container unchanged. The kernels take bf16 activations and bf16
scales/zeros: that rounding is the only difference from the float path.

A ragged last group (``in_features % group_size != 0``) is padded to a whole group with ``q = 0``
and the activations with zeros, so the padding adds exactly zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

SUPPORTED_GROUPS = (32, 64, 128, 256)
_INNER_K_TILES = 2


@dataclass
class Int4Weight:
    """A weight converted for the int4 kernel of one device type."""

    packed: torch.Tensor  # kernel-specific layout
    scales_and_zeros: torch.Tensor  # (K_padded / group, N, 2) bf16
    group_size: int
    in_features: int
    padded_in: int


def int4_supported(out_features: int, group_size: int, n_bits: int, device: torch.device) -> bool:
    if n_bits > 4 or group_size not in SUPPORTED_GROUPS or out_features % 16:
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")


def to_int4_weight(q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, group_size: int) -> Int4Weight:
    """Signed codes ``(N, K)``, per-group ``scale``/``offset`` ``(N, K/g)`` -> the kernel's layout."""
    n, k = q.shape
    padded = -(-k // group_size) * group_size
    padded = -(-padded // (_INNER_K_TILES * 16)) * (_INNER_K_TILES * 16)
    u = torch.full((n, padded), 8, dtype=torch.int32, device=q.device)
    u[:, :k] = q.to(torch.int32) + 8
    groups = padded // group_size
    scale_p = torch.ones(n, groups, dtype=scale.dtype, device=scale.device)
    offset_p = torch.zeros(n, groups, dtype=offset.dtype, device=offset.device)
    scale_p[:, : scale.shape[1]], offset_p[:, : offset.shape[1]] = scale, offset
    scales_and_zeros = torch.stack([scale_p.t(), offset_p.t()], dim=-1).to(torch.bfloat16).contiguous()
    if q.device.type == "cuda":
        nibbles = (u[:, ::2] << 4 | u[:, 1::2]).to(torch.uint8)  # tinygemm: even column in the high nibble
        packed = torch.ops.aten._convert_weight_to_int4pack(nibbles, _INNER_K_TILES)
    else:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(u, _INNER_K_TILES)
    return Int4Weight(packed, scales_and_zeros, group_size, k, padded)


def int4_linear(x: torch.Tensor, w: Int4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W^T (+ bias)`` on the int4 kernel; ``x`` is ``(..., K)``, computed in bf16."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).to(torch.bfloat16)
    if w.padded_in != w.in_features:
        x2 = F.pad(x2, (0, w.padded_in - w.in_features))
    if x2.device.type == "cuda":
        y = torch.ops.aten._weight_int4pack_mm(x2, w.packed, w.group_size, w.scales_and_zeros)
    else:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, w.packed, w.group_size, w.scales_and_zeros)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.reshape(*shape[:-1], -1).to(x.dtype)
