"""Per-token dynamic fake quantization of activations and of the key/value projections (the
W4A8KV8 setting of LLM-QAT and DL-QAT): symmetric, absmax per token, straight-through round."""

from __future__ import annotations

import torch

from dlqat.quant.primitives import check_bits, clamp_scale, round_ste


def fake_quantize_per_token(x: torch.Tensor, n_bits: int, group_size: int | None = None) -> torch.Tensor:
    """``x (..., d)``: each token (last dim), or each ``group_size`` slice of it (e.g. one attention
    head), scaled by ``absmax / (2^(n-1) - 1)``, rounded, clipped."""
    check_bits(n_bits)
    if group_size is not None and group_size != x.shape[-1]:
        return fake_quantize_per_token(x.unflatten(-1, (-1, group_size)), n_bits).flatten(-2)
    hi = 2 ** (n_bits - 1) - 1
    scale = clamp_scale(x.detach().abs().amax(dim=-1, keepdim=True) / hi)
    return torch.clamp(round_ste(x / scale), -hi - 1, hi) * scale
