"""Pure quantizer math (no modules, no models)."""

from dlqat.quant.primitives import (
    FLOAT,
    Storage,
    apply_magnitude,
    code_range,
    dequantize,
    fake_quantize,
    integer_offset,
    merge_lora,
    minmax_scale_offset,
    mse_scale_offset,
    n_groups,
    quantize,
    resolve_group_size,
    round_ste,
)

__all__ = [
    "FLOAT",
    "Storage",
    "apply_magnitude",
    "code_range",
    "dequantize",
    "fake_quantize",
    "integer_offset",
    "merge_lora",
    "minmax_scale_offset",
    "mse_scale_offset",
    "n_groups",
    "quantize",
    "resolve_group_size",
    "round_ste",
]
