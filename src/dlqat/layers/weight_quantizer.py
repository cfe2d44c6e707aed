"""The group quantizer of one weight, as a module: its clipping range (``scale``, ``offset``), DL-QAT's
per-group ``magnitude``, where the range comes from (``clip_mode``) and how the export stores it
(``storage``). ``QuantLoRALinear`` composes one; the math is ``dlqat.quant``'s."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum

import torch
from torch import nn

from dlqat.quant import (
    FLOAT,
    Storage,
    apply_magnitude,
    fake_quantize,
    integer_offset,
    minmax_scale_offset,
    mse_scale_offset,
    n_groups,
    quantize,
)


class ClipMode(str, Enum):
    """Where the clipping range (scale, offset) comes from (DL-QAT paper, Table 3)."""

    DYNAMIC = "dynamic"  # min/max of the current merged weight every step, never trained
    LEARN_THEN_FIX = "learn_then_fix"  # DL-QAT: trained alone in phase 1, frozen in phase 2
    JOINT = "joint"  # trained together with A, B (and m) in phase 2 (L4Q-style)


# Where scale/offset start: min/max (the untrained layer is RTN), the clipping search of
# ``mse_scale_offset`` (RTN with MSE-searched ranges) or GPTQ with min/max or searched group ranges
# (``gptq``, ``gptq-mse``; ``dlqat.methods.gptq_start``: needs calibration data, so the layer starts
# at min/max and the method's ``calibrate`` step replaces it).
GPTQ_INITS = {"gptq": "minmax", "gptq-mse": "mse"}  # a GPTQ start -> the GPTQ grid it uses
INITS = ("minmax", "mse", *GPTQ_INITS)


class WeightQuantizer(nn.Module):
    """Parameters ``scale``/``offset`` (None with ``clip_mode=dynamic``), ``magnitude`` (None when
    off) and ``shift`` (a per-group move of the dequantized weight after rounding, zero at init; None when
    off), each ``(out, n_groups)``, initialised from ``weight (out, in)``."""

    def __init__(
        self,
        weight: torch.Tensor,
        n_bits: int,
        group_size: int,
        use_magnitude: bool = True,
        clip_mode: ClipMode | str = ClipMode.LEARN_THEN_FIX,
        init: str = "minmax",
        storage: Storage = FLOAT,
        use_shift: bool = False,
    ) -> None:
        super().__init__()
        if init not in INITS:
            raise ValueError(f"init={init!r}: expected one of {', '.join(INITS)}")
        if use_shift and storage.int_zero:
            raise ValueError("use_shift with an integer zero point: the offset must stay -scale * z")
        self.n_bits, self.group_size = n_bits, group_size
        self.clip_mode, self.storage = ClipMode(clip_mode), storage
        groups = (weight.shape[0], n_groups(weight.shape[1], group_size))
        factory = {"device": weight.device, "dtype": weight.dtype}
        self.magnitude = nn.Parameter(torch.ones(groups, **factory)) if use_magnitude else None
        self.shift = nn.Parameter(torch.zeros(groups, **factory)) if use_shift else None
        if self.clip_mode is ClipMode.DYNAMIC:
            self.scale = self.offset = None
        else:
            scale, offset = self.initial_range(weight, init)
            self.scale, self.offset = nn.Parameter(scale), nn.Parameter(offset)

    def initial_range(self, w: torch.Tensor, init: str = "minmax") -> tuple[torch.Tensor, torch.Tensor]:
        """Min/max or searched ``(scale, offset)`` of ``w`` (no gradient; shapes only on meta)."""
        if w.device.type == "meta":
            shape = (w.shape[0], n_groups(w.shape[1], self.group_size))
            return torch.empty(shape, device="meta", dtype=w.dtype), torch.empty(shape, device="meta", dtype=w.dtype)
        search = mse_scale_offset if init == "mse" else minmax_scale_offset
        with torch.no_grad():
            return search(w.detach(), self.n_bits, self.group_size)

    def range(self, merged: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The clipping range the codes come from (dynamic: of ``merged``; with ``storage.int_zero``
        the offset is ``-scale * z``, ``z`` an integer)."""
        scale, offset = self.initial_range(merged) if self.clip_mode is ClipMode.DYNAMIC else (self.scale, self.offset)
        if self.storage.int_zero:
            offset = integer_offset(scale, offset, self.n_bits)
        return scale, offset

    def fake_quantize(self, merged: torch.Tensor) -> torch.Tensor:
        """The float weight the quantized layer computes with (straight-through in ``merged``)."""
        scale, offset = self.range(merged)
        return fake_quantize(
            merged, scale, offset, self.n_bits, self.group_size, self.magnitude, self.storage, self.shift
        )

    @torch.no_grad()
    def codes(self, merged: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Integer codes ``q`` (int8, ``(out, in)``) and the final per-group ``scale``/``offset`` (the
        magnitude folded in, rounded as stored): ``W = scale * q + offset``."""
        scale, offset = self.range(merged)
        q = quantize(merged, scale, offset, self.n_bits, self.group_size)
        return q.to(torch.int8), *apply_magnitude(scale, offset, self.magnitude, self.storage, self.shift)

    def extra_repr(self) -> str:
        return (
            f"n_bits={self.n_bits}, group_size={self.group_size}, magnitude={self.magnitude is not None}, "
            f"shift={self.shift is not None}, clip_mode={self.clip_mode.value}, storage={self.storage}"
        )


@contextmanager
def minmax_ranges(model: nn.Module) -> Iterator[int]:
    """Inside the block every trainable range is min/max of its layer's frozen ``W0``: an untrained
    model started from another ``init`` then computes plain RTN (the reference row every report keeps).
    Yields how many quantizers were switched; their own ranges are back afterwards."""
    saved = []
    for module in model.modules():
        quantizer = getattr(module, "quantizer", None)
        if isinstance(quantizer, WeightQuantizer) and quantizer.scale is not None:
            saved.append((quantizer, quantizer.scale.data, quantizer.offset.data))
            scale, offset = quantizer.initial_range(module.weight, "minmax")
            quantizer.scale.data, quantizer.offset.data = scale, offset
    try:
        yield len(saved)
    finally:
        for quantizer, scale, offset in saved:
            quantizer.scale.data, quantizer.offset.data = scale, offset
