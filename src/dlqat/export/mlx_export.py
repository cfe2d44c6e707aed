"""MLX export: an mlx-lm model folder whose quantized layers carry our codes exactly.

MLX's affine format stores ``w = scale * u + bias`` with unsigned ``u`` in ``0..2^n-1``, packed along
each row as one little-endian bit stream in uint32 words (element ``i`` at bits ``n*i .. n*i+n-1``;
checked against ``mx.quantize`` in the tests). Our signed codes ``q`` are stored as ``u = q + 2^(n-1)``
in exactly that bit stream (``dlqat.quant.bitpack``), so the packed bytes are reused as they are
(viewed as uint32), and ``bias = offset - 2^(n-1) * scale`` gives the same weight; the only change is
the float rounding of that subtraction (and of the storage dtype when it is not fp32).

MLX has no ragged groups and takes group sizes 32, 64 and 128 and widths 2, 3, 4, 5, 6 and 8 bits:
anything else is refused naming the layer. Layers keep their own bits/group size (recorded per layer
in ``config.json``'s ``quantization``); embeddings, norms and a float head stay float.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import PreTrainedModel

from dlqat.export.serving import format_tensors, write_format_folder
from dlqat.fileio import safetensors_producer
from dlqat.layers import QuantizedLinear
from dlqat.quant import resolve_group_size

MLX_GROUP_SIZES = (32, 64, 128)
MLX_BITS = (2, 3, 4, 5, 6, 8)
MLX_MARKER = "dlqat-mlx-v1"


def check_mlx(name: str, layer: QuantizedLinear) -> None:
    """Refuse what MLX's affine format cannot carry exactly, with the group sizes that would work."""
    g = resolve_group_size(layer.group_size, layer.in_features)
    if layer.n_bits not in MLX_BITS:
        raise ValueError(f"{name}: {layer.n_bits}-bit codes; MLX affine quantization takes {MLX_BITS} bits")
    if g not in MLX_GROUP_SIZES or layer.in_features % g:
        fits = [s for s in MLX_GROUP_SIZES if layer.in_features % s == 0]
        raise ValueError(
            f"{name}: in_features={layer.in_features} with group_size={layer.group_size}: MLX needs a group size "
            f"from {MLX_GROUP_SIZES} that divides in_features (no ragged groups); train with --group_size "
            f"{max(fits) if fits else 32} for an exact MLX export"
        )


def mlx_tensors(name: str, layer: QuantizedLinear, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """``NAME.weight`` (uint32 words), ``NAME.scales``, ``NAME.biases`` of one layer."""
    check_mlx(name, layer)
    half = 2 ** (layer.n_bits - 1)
    words = layer.packed.contiguous().view(torch.int32).view(torch.uint32)  # little-endian bytes -> words
    return {
        f"{name}.weight": words,
        f"{name}.scales": layer.scale.to(dtype),
        f"{name}.biases": (layer.offset - half * layer.scale).to(dtype),
    }


def export_mlx(
    model: PreTrainedModel, tokenizer, out_dir: str | Path, dtype: torch.dtype = torch.bfloat16, overwrite: bool = False
) -> Path:
    """Write a converted model (``QuantizedLinear`` layers) as an mlx-lm folder, atomically."""
    tensors, layers = format_tensors(model, lambda n, m: mlx_tensors(n, m, dtype), dtype, "MLX export")
    config = mlx_config(model.config.to_dict())
    per_layer = {name: {"group_size": resolve_group_size(m.group_size, m.in_features), "bits": m.n_bits}
                 for name, m in layers.items()}  # fmt: skip
    config["quantization"] = {**next(iter(per_layer.values())), "mode": "affine", **per_layer}
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    return write_format_folder(out_dir, tensors, config, tokenizer, MLX_MARKER, overwrite, "MLX export")


def mlx_config(config: dict) -> dict:
    """transformers 5 keeps ``rope_theta`` (and scaling) under ``rope_parameters``; mlx-lm reads the
    older top-level keys and would fall back to theta 10000 (SmolLM2 uses 100000): write both."""
    config = dict(config)
    config.pop("quantization_config", None)
    rope = config.get("rope_parameters") or {}
    if "rope_theta" in rope:
        config["rope_theta"] = rope["rope_theta"]
    if rope.get("rope_type", "default") != "default":
        config["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    return config


def is_mlx_export(path: Path) -> bool:
    return safetensors_producer(path) == MLX_MARKER
