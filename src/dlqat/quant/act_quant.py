"""Per-token dynamic fake quantization of activations and of the key/value projections (the
W4A8KV8 setting of LLM-QAT and DL-QAT): symmetric, absmax per token, straight-through round."""

from __future__ import annotations

import torch

from dlqat.quant.primitives import check_bits, clamp_scale, round_ste


def fake_quantize_per_token(x: torch.Tensor, n_bits: int) -> torch.Tensor:
    """``x (..., d)``: each token (last dim) scaled by ``absmax / (2^(n-1) - 1)``, rounded, clipped."""
    check_bits(n_bits)
    hi = 2 ** (n_bits - 1) - 1
    scale = clamp_scale(x.detach().abs().amax(dim=-1, keepdim=True) / hi)
    return torch.clamp(round_ste(x / scale), -hi - 1, hi) * scale
