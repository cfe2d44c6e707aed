"""GPTQ (Frantar et al., 2022): column-by-column quantization that spreads each column's rounding
error over the not-yet-quantized columns using the inverse Hessian of the layer's inputs.

The quantizer is dlqat's asymmetric group quantizer; a group's scale and offset are taken from the
(already error-updated) weights when the algorithm reaches the group's first column, as in the reference
implementation with ``groupsize``: their min/max (``grid="minmax"``, the reference's default) or the
clipping search of its ``mse=True`` (``grid="mse"``: the min/max range shrunk to the least squared
rounding error, ``dlqat.quant.primitives.mse_scale_offset``). ``H = 2/N sum x x^T`` over calibration tokens.
"""

from __future__ import annotations

import torch

from dlqat.quant.primitives import minmax_scale_offset, mse_scale_offset, resolve_group_size, round_codes

GRIDS = ("minmax", "mse")


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    n_bits: int,
    group_size: int,
    damp: float = 0.01,
    block: int = 128,
    grid: str = "minmax",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ of ``weight (out, in)`` given ``hessian (in, in)``.

    Returns:
        ``q`` int8 codes ``(out, in)``, ``scale`` and ``offset`` ``(out, n_groups)`` (float32).
    """
    return gptq_with_updates(weight, hessian, n_bits, group_size, damp, block, grid)[:3]


@torch.no_grad()
def gptq_with_updates(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    n_bits: int,
    group_size: int,
    damp: float = 0.01,
    block: int = 128,
    grid: str = "minmax",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ, also returning ``updated (out, in)``: each column as it was when rounded (the weight plus the
    error compensation it received), so ``round_codes((updated - offset) / scale)`` are exactly the codes.
    A QAT start from GPTQ keeps ``updated`` as its frozen base weight (``dlqat.methods.gptq_start``)."""
    if grid not in GRIDS:
        raise ValueError(f"grid={grid!r}: expected one of {', '.join(GRIDS)}")
    group_range = mse_scale_offset if grid == "mse" else minmax_scale_offset
    w = weight.detach().float().clone()
    out_features, in_features = w.shape
    g = resolve_group_size(group_size, in_features)
    h = hessian.float().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += damp * torch.mean(torch.diag(h)) * torch.eye(in_features, device=h.device)
    h_inv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    q = torch.zeros(out_features, in_features, dtype=torch.int8, device=w.device)
    updated = torch.zeros_like(w)
    n_groups = -(-in_features // g)
    scale = torch.zeros(out_features, n_groups, device=w.device)
    offset = torch.zeros_like(scale)
    for i1 in range(0, in_features, block):
        i2 = min(i1 + block, in_features)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        h_inv1 = h_inv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % g == 0:
                group = torch.cat([w1[:, i:], w[:, i2:]], dim=1)[:, : min(g, in_features - col)]
                s, b = group_range(group, n_bits, -1)
                scale[:, col // g], offset[:, col // g] = s[:, 0], b[:, 0]
            s, b = scale[:, col // g], offset[:, col // g]
            updated[:, col] = w1[:, i]
            col_q = round_codes((w1[:, i] - b) / s, n_bits)
            q[:, col] = col_q.to(torch.int8)
            err = (w1[:, i] - (s * col_q + b)) / h_inv1[i, i]
            w1[:, i:] -= err.unsqueeze(1) @ h_inv1[i, i:].unsqueeze(0)
            err1[:, i] = err
        w[:, i2:] -= err1 @ h_inv[i1:i2, i2:]
    return q, scale, offset, updated
