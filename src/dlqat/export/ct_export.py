"""GPTQ-style export as compressed-tensors ``pack-quantized`` (what vLLM, SGLang and transformers load).

The format stores ``w = scale * (q - zero_point)`` per group with signed integer codes ``q`` and an
*integer* zero point. Our weight is ``scale * q + offset``, so it is exact only when ``offset = -scale
* z`` with integer ``z``: train with ``--zero_point int`` (``dlqat.quant.integer_offset``), and the
zero point is ``z = -offset / scale``. A model with float offsets is refused with that hint. Codes and
zero points are packed by compressed-tensors' own ``pack_to_int32``; the config comes from its
``QuantizationConfig`` (one config group per (bits, group size), targeting the layers by name).
Ragged groups are refused (the format assumes ``in_features`` is a multiple of the group size).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import PreTrainedModel

from dlqat.export.serving import format_tensors, write_format_folder
from dlqat.fileio import safetensors_producer
from dlqat.layers import QuantizedLinear
from dlqat.quant import resolve_group_size

CT_MARKER = "dlqat-compressed-tensors-v1"


def integer_zero_point(name: str, layer: QuantizedLinear) -> torch.Tensor:
    """``z = -offset / scale`` as int8, or a refusal when the offsets are not integer multiples (up to the
    float rounding of the product ``scale * z`` the offset was stored as)."""
    z = -layer.offset.double() / layer.scale.double()
    lo, hi = -(2 ** (layer.n_bits - 1)), 2 ** (layer.n_bits - 1) - 1
    if (z - z.round()).abs().max() > 1e-4 or z.min() < lo - 1e-4 or z.max() > hi + 1e-4:
        raise ValueError(
            f"{name}: offsets are not -scale * (integer zero point): GPTQ/compressed-tensors formats cannot carry "
            "them exactly; train with --zero_point int"
        )
    return z.round().to(torch.int8)


def ct_tensors(name: str, layer: QuantizedLinear, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    g = resolve_group_size(layer.group_size, layer.in_features)
    if layer.in_features % g:
        raise ValueError(
            f"{name}: in_features={layer.in_features} is not a multiple of group_size={layer.group_size}; "
            "compressed-tensors has no ragged groups (train with a group size that divides it)"
        )
    return {
        f"{name}.weight_packed": pack_to_int32(layer.codes(), layer.n_bits),
        f"{name}.weight_scale": layer.scale.to(dtype),
        f"{name}.weight_zero_point": pack_to_int32(integer_zero_point(name, layer), layer.n_bits, packed_dim=0),
        f"{name}.weight_shape": torch.tensor([layer.out_features, layer.in_features]),
    }


def quantization_config(layers: dict[str, QuantizedLinear]) -> dict:
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    groups: dict[tuple[int, int], list[str]] = {}
    for name, layer in layers.items():
        groups.setdefault((layer.n_bits, resolve_group_size(layer.group_size, layer.in_features)), []).append(name)
    schemes = {
        f"group_{i}": QuantizationScheme(
            targets=names,
            weights=QuantizationArgs(num_bits=bits, type="int", symmetric=False, strategy="group", group_size=g),
        )
        for i, ((bits, g), names) in enumerate(groups.items())
    }
    config = QuantizationConfig(config_groups=schemes, format="pack-quantized", quantization_status="compressed")
    return config.to_dict()


def export_compressed_tensors(
    model: PreTrainedModel, tokenizer, out_dir: str | Path, dtype: torch.dtype = torch.bfloat16, overwrite: bool = False
) -> Path:
    """Write a converted model with integer zero points as a compressed-tensors folder, atomically."""
    what = "GPTQ (compressed-tensors) export"
    tensors, layers = format_tensors(model, lambda n, m: ct_tensors(n, m, dtype), dtype, what)
    config = model.config.to_dict()
    config["quantization_config"] = quantization_config(layers)
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    return write_format_folder(out_dir, tensors, config, tokenizer, CT_MARKER, overwrite, what)


def is_ct_export(path: Path) -> bool:
    return safetensors_producer(path) == CT_MARKER
