"""Bit-packing of signed n-bit codes into bytes, one layout for every width (2..8 bits).

Layout ("dlqat-bitstream-le"): codes are shifted to unsigned ``u = q + 2^(n-1)`` (``0..2^n-1``).
Along each row, every run of 8 codes (the row is padded with ``u = 0`` to a multiple of 8) becomes
``n`` bytes: code ``k`` of the run occupies bits ``n*k .. n*k+n-1`` of that little-endian ``n``-byte
integer. So 4-bit puts code ``2j`` in the low nibble of byte ``j`` and ``2j+1`` in the high nibble;
2-bit puts four codes per byte, lowest first; 3-bit puts 8 codes in 3 bytes.

Shapes: ``q`` int8 ``(out, in)`` <-> ``packed`` uint8 ``(out, ceil(in / 8) * n)``.
"""

from __future__ import annotations

import torch

from dlqat.quant.primitives import check_bits

_RUN = 8  # codes per packed run; a run of n-bit codes fills exactly n bytes


def packed_width(in_features: int, n_bits: int) -> int:
    return -(-in_features // _RUN) * n_bits


def pack_codes(q: torch.Tensor, n_bits: int) -> torch.Tensor:
    """Signed codes ``(out, in)`` in ``[-2^(n-1), 2^(n-1)-1]`` -> packed uint8 (see module docstring)."""
    check_bits(n_bits)
    lo, hi = -(2 ** (n_bits - 1)), 2 ** (n_bits - 1) - 1
    if q.numel() and (q.min() < lo or q.max() > hi):
        raise ValueError(f"codes outside the {n_bits}-bit range [{lo}, {hi}]: min {int(q.min())}, max {int(q.max())}")
    out_features, in_features = q.shape
    u = q.to(torch.int64) - lo  # unsigned codes
    pad = -in_features % _RUN
    if pad:
        u = torch.cat([u, u.new_zeros(out_features, pad)], dim=1)
    runs = u.view(out_features, -1, _RUN)  # (out, runs, 8)
    shifts = torch.arange(_RUN, device=q.device) * n_bits
    word = (runs << shifts).sum(-1)  # (out, runs): up to 64 bits
    byte_shifts = torch.arange(n_bits, device=q.device) * 8
    packed = (word.unsqueeze(-1) >> byte_shifts) & 0xFF  # (out, runs, n)
    return packed.to(torch.uint8).view(out_features, -1)


def unpack_codes(packed: torch.Tensor, n_bits: int, in_features: int) -> torch.Tensor:
    """Inverse of ``pack_codes``: packed uint8 ``(out, ceil(in/8)*n)`` -> signed int8 ``(out, in)``."""
    check_bits(n_bits)
    out_features = packed.shape[0]
    if packed.shape[1] != packed_width(in_features, n_bits):
        raise ValueError(
            f"packed width {packed.shape[1]} does not hold {in_features} {n_bits}-bit codes "
            f"(expected {packed_width(in_features, n_bits)} bytes per row)"
        )
    by = packed.view(out_features, -1, n_bits).to(torch.int64)  # (out, runs, n)
    word = (by << (torch.arange(n_bits, device=packed.device) * 8)).sum(-1)  # (out, runs)
    u = (word.unsqueeze(-1) >> (torch.arange(_RUN, device=packed.device) * n_bits)) & ((1 << n_bits) - 1)
    q = u.view(out_features, -1)[:, :in_features] - 2 ** (n_bits - 1)
    return q.to(torch.int8)
