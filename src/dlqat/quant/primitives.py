"""Asymmetric group-wise quantizer math: pure tensor functions, no modules, no models.

Layout: a weight ``w`` is ``(out_features, in_features)``; groups run along the input dimension,
``group_size`` columns each (``-1``: one group per output channel). Per-group tensors (``scale``,
``offset``, ``magnitude``) are ``(out_features, n_groups)``.

Ragged last group: when ``in_features % group_size != 0`` (SmolLM2: 576 with group 128), the last
group simply has fewer columns (576 = 4 x 128 + 64). Internally the weight is padded by repeating
its last column, which leaves every group's min/max unchanged, and the padding is sliced off before
the weight is used, so it never receives or sends gradient. Exports store the unpadded codes.

Codes: ``q = clip(round((w - offset) / scale), -2^(n-1), 2^(n-1)-1)`` (signed), and the weight is
``w_dq = scale * q + offset``. Every method's final weight has that form.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

MIN_BITS, MAX_BITS = 2, 8
# A group whose values are all equal has max == min; the scale is floored so we never divide by 0
# (in fp16 at its smallest normal number: 1e-8 would underflow to 0 there).
SCALE_EPS = 1e-8


def scale_floor(dtype: torch.dtype) -> float:
    """The smallest scale used for ``dtype``: ``SCALE_EPS``, or the dtype's smallest normal if larger."""
    return max(SCALE_EPS, torch.finfo(dtype).tiny)


def clamp_scale(scale: torch.Tensor) -> torch.Tensor:
    return scale.clamp_min(scale_floor(scale.dtype))


class _RoundSTE(torch.autograd.Function):
    """round() whose backward is the identity (straight-through estimator)."""

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        return torch.round(x)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        pass

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


def round_ste(x: torch.Tensor) -> torch.Tensor:
    return _RoundSTE.apply(x)


def check_bits(n_bits: int) -> None:
    if not isinstance(n_bits, int) or not MIN_BITS <= n_bits <= MAX_BITS:
        raise ValueError(f"n_bits={n_bits!r}: expected an integer from {MIN_BITS} to {MAX_BITS}")


def code_range(n_bits: int) -> tuple[int, int]:
    """Signed code range ``(-2^(n-1), 2^(n-1) - 1)``."""
    check_bits(n_bits)
    return -(2 ** (n_bits - 1)), 2 ** (n_bits - 1) - 1


def check_group_size(group_size: int, name: str = "group_size") -> None:
    if group_size != -1 and (not isinstance(group_size, int) or group_size < 1):
        raise ValueError(f"{name}={group_size!r}: expected a positive integer or -1 (per channel)")


def resolve_group_size(group_size: int, in_features: int) -> int:
    """Columns per group; ``-1`` means the whole row (per output channel)."""
    check_group_size(group_size)
    return in_features if group_size == -1 else min(group_size, in_features)


def n_groups(in_features: int, group_size: int) -> int:
    return math.ceil(in_features / resolve_group_size(group_size, in_features))


def to_groups(w: torch.Tensor, group_size: int, pad_value: float | None = None) -> torch.Tensor:
    """``(..., in) -> (..., n_groups, g)``: the one group layout every caller uses.

    A ragged last group is padded by repeating the last column (``pad_value=None``: leaves every
    group's min/max unchanged, what the quantizer needs) or with ``pad_value`` (0 for sums and
    gradients, so the padding adds nothing).
    """
    in_features = w.shape[-1]
    g = resolve_group_size(group_size, in_features)
    pad = n_groups(in_features, group_size) * g - in_features
    if pad:
        fill = w[..., -1:] if pad_value is None else w.new_full((*w.shape[:-1], 1), pad_value)
        w = torch.cat([w, fill.expand(*w.shape[:-1], pad)], dim=-1)
    return w.unflatten(-1, (-1, g))


def from_groups(wg: torch.Tensor, in_features: int) -> torch.Tensor:
    """``(out, n_groups, g) -> (out, in)``, dropping the padding of a ragged last group."""
    return wg.reshape(wg.shape[0], -1)[:, :in_features]


def expand_groups(t: torch.Tensor, group_size: int, in_features: int) -> torch.Tensor:
    """Per-group ``(out, n_groups)`` -> per-column ``(out, in)``."""
    g = resolve_group_size(group_size, in_features)
    return t.repeat_interleave(g, dim=1)[:, :in_features]


def merge_lora(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """``W0 + scaling * B @ A`` in the weight's own dtype, also under autocast.

    The codes must come from the merged weight the export computes: a bf16 ``B @ A`` (autocast's
    choice for a matmul) moves weights near a rounding boundary to the neighbouring code.
    """
    if torch.amp.is_autocast_available(weight.device.type):
        with torch.autocast(weight.device.type, enabled=False):
            return weight + scaling * (lora_b @ lora_a)
    return weight + scaling * (lora_b @ lora_a)


def minmax_scale_offset(w: torch.Tensor, n_bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """DL-QAT's min/max init: max maps to code ``2^(n-1)-1`` and min to ``-2^(n-1)``.

    ``s = (max - min) / (2^n - 1)``, ``b = (2^(n-1) max + (2^(n-1) - 1) min) / (2^n - 1)``.

    Returns:
        ``scale, offset``, each ``(out, n_groups)``.
    """
    check_bits(n_bits)
    wg = to_groups(w, group_size)
    return _range_scale_offset(wg.amax(dim=-1), wg.amin(dim=-1), n_bits)


def _range_scale_offset(w_max: torch.Tensor, w_min: torch.Tensor, n_bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and offset that map ``w_max`` to the top code and ``w_min`` to the bottom one."""
    levels = 2**n_bits - 1
    half = 2 ** (n_bits - 1)
    scale = clamp_scale((w_max - w_min) / levels)
    offset = (half * w_max + (half - 1) * w_min) / levels
    return scale, offset


def mse_scale_offset(
    w: torch.Tensor, n_bits: int, group_size: int, grid: int = 20, min_shrink: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipping search: per group, the min/max range shrunk by the factor (from ``linspace(1,
    min_shrink, grid)``) whose round-to-nearest weight has the least squared error.

    The grid search of GPTQ's quantizer (``mse=True``) and llama.cpp's k-quants: clipping a few
    outliers buys a finer step for the rest of the group, which at 2-3 bits outweighs the clipped
    error. Factor 1 is min/max itself, so the result is never worse than min/max (ties keep the larger
    range). A ragged last group's padding is left out of its error.

    Returns:
        ``scale, offset``, each ``(out, n_groups)``.
    """
    wg = to_groups(w, group_size)  # (out, G, g)
    valid = _valid_columns(w, wg)
    w_max, w_min = wg.amax(dim=-1), wg.amin(dim=-1)
    best_scale, best_offset = _range_scale_offset(w_max, w_min, n_bits)
    best_err = torch.full_like(w_max, math.inf)
    for shrink in torch.linspace(1.0, min_shrink, grid).tolist():
        scale, offset = _range_scale_offset(shrink * w_max, shrink * w_min, n_bits)
        q = round_codes((wg - offset.unsqueeze(-1)) / scale.unsqueeze(-1), n_bits)
        err = ((q * scale.unsqueeze(-1) + offset.unsqueeze(-1) - wg).square() * valid).sum(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale, best_offset = torch.where(better, scale, best_scale), torch.where(better, offset, best_offset)
    return best_scale, best_offset


def _valid_columns(w: torch.Tensor, wg: torch.Tensor) -> torch.Tensor:
    """``(1, G, g)`` ones on real columns, zeros on a ragged last group's padding."""
    cols = torch.arange(wg.shape[1] * wg.shape[2], device=w.device) < w.shape[1]
    return cols.to(w.dtype).view(1, wg.shape[1], wg.shape[2])


def round_codes(u: torch.Tensor, n_bits: int, straight_through: bool = False) -> torch.Tensor:
    """``clip(round(u), -2^(n-1), 2^(n-1)-1)`` for ``u = (w - offset) / scale``: the one rounding rule
    (quantizer, GPTQ's column loop, the lean backward's masks all follow it)."""
    lo, hi = code_range(n_bits)
    return torch.clamp(round_ste(u) if straight_through else torch.round(u), lo, hi)


def quantize(w: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, n_bits: int, group_size: int) -> torch.Tensor:
    """Integer codes (as floats) of ``w``; differentiable through the STE.

    Gradients: ``w`` gets the identity inside the clip range and zero outside; ``scale`` and
    ``offset`` get LSQ-style gradients from ordinary autograd around the one STE.

    Returns:
        ``q`` of shape ``(out, in)``, integer-valued, in ``code_range(n_bits)``.
    """
    wg = to_groups(w, group_size)
    scale = clamp_scale(scale)
    qg = round_codes((wg - offset.unsqueeze(-1)) / scale.unsqueeze(-1), n_bits, straight_through=True)
    return from_groups(qg, w.shape[1])


def dequantize(q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, group_size: int) -> torch.Tensor:
    """``scale * q + offset`` per group: ``q`` is ``(out, in)``, ``scale``/``offset`` ``(out, n_groups)``.

    The fake-quantized training weight and the exported runtime weight both come from this one
    function on the same values, which is why reloading an export reproduces logits bit for bit.
    """
    in_features = q.shape[1]
    return q * expand_groups(scale, group_size, in_features) + expand_groups(offset, group_size, in_features)


@dataclass(frozen=True)
class Storage:
    """How the final per-group ``scale``/``offset`` will be stored by the export a model is trained for.

    ``dtype``: fp16/bf16 storage (serving formats keep scales in half precision): training rounds the
    final scale and offset to it, straight-through, so the stored values are the trained ones.
    ``int_zero``: the offset is ``-scale * z`` with an integer zero point ``z`` in the code range
    (GPTQ / compressed-tensors); see :func:`integer_offset`.
    """

    dtype: torch.dtype | None = None
    int_zero: bool = False


FLOAT = Storage()


def round_to_dtype(x: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """``x`` rounded to ``dtype`` and back, with an identity gradient (straight-through)."""
    if dtype is None or dtype == x.dtype:
        return x
    return x + (x.to(dtype).to(x.dtype) - x).detach()


def integer_offset(scale: torch.Tensor, offset: torch.Tensor, n_bits: int) -> torch.Tensor:
    """The nearest offset of the form ``-scale * z``, ``z`` an integer in the code range (straight-
    through round, as EfficientQAT): the grid ``scale * (q - z)`` of GPTQ-style asymmetric formats."""
    lo, hi = code_range(n_bits)
    scale = clamp_scale(scale)
    return -scale * torch.clamp(round_ste(-offset / scale), lo, hi)


def apply_magnitude(
    scale: torch.Tensor,
    offset: torch.Tensor,
    magnitude: torch.Tensor | None,
    storage: Storage = FLOAT,
    shift: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DL-QAT's ``m * (s q + b + d)`` as the plain group quantizer ``(m s) q + m (b + d)``, as stored.

    ``shift`` ``d`` (optional, per group) moves the dequantized group after rounding: unlike ``b`` it
    does not move the codes, so it gets the whole group's gradient (``b``'s in-range gradient is zero
    under the straight-through round). Training and export both take the final scale/offset from here,
    so they agree bit for bit. With ``storage.dtype`` both are rounded to it; with ``storage.int_zero``
    (``offset = -s z``) the final offset is ``-(m s) z`` from the rounded scale, so ``z`` stays the
    integer zero point (no shift: it would make the offset a non-integer multiple of the scale).
    """
    scale = clamp_scale(scale)
    final_scale = scale if magnitude is None else magnitude * scale
    final_scale = round_to_dtype(final_scale, storage.dtype)
    if storage.int_zero:
        if shift is not None:
            raise ValueError("shift with an integer zero point: the offset must stay -scale * z")
        return final_scale, final_scale * round_ste(offset / scale)
    offset = offset if shift is None else offset + shift
    final_offset = offset if magnitude is None else magnitude * offset
    return final_scale, round_to_dtype(final_offset, storage.dtype)


def fake_quantize(
    w: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor,
    n_bits: int,
    group_size: int,
    magnitude: torch.Tensor | None = None,
    storage: Storage = FLOAT,
    shift: torch.Tensor | None = None,
) -> torch.Tensor:
    """``m * (s * Q(w) + b + d)``: the float weight the quantized model computes with."""
    q = quantize(w, scale, offset, n_bits, group_size)
    return dequantize(q, *apply_magnitude(scale, offset, magnitude, storage, shift), group_size)
