"""torchao export: a transformers folder (``TorchAoConfig(Int4WeightOnlyConfig)``) whose int4 weights
carry our codes, scales and offsets exactly; transformers and vLLM load it with torchao.

torchao's ``Int4Tensor`` (``int4_packing_format="plain"``, the v2 config) stores ``w = q * scale +
zero_point`` per group with signed codes ``q`` in ``-8..7`` (fbgemm/mslk's ``int4_row_quantize_zp``
convention), two codes per byte (even column in the low nibble), and ``scale``/``zero_point`` as
``(in_features / group, out_features)``. That is our ``w = scale * q + offset`` with
``zero_point = offset``: nothing is re-rounded except the storage dtype of scale and offset (bf16; train
with ``--qparam_dtype bf16`` and the export is the trained model bit for bit).

Only 4-bit layers with groups that divide ``in_features`` fit (no ragged groups, one group size for
the model); anything else is refused naming the layer. The tensors are flattened with torchao's own
``flatten_tensor_state_dict`` (the safetensors layout transformers' ``TorchAoHfQuantizer`` reads).
The GPU kernel (mslk) is not needed to write or load the folder, only to run it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import PreTrainedModel

from dlqat.export.serving import format_tensors, write_format_folder
from dlqat.fileio import safetensors_producer
from dlqat.layers import QuantizedLinear
from dlqat.quant import resolve_group_size

TORCHAO_MARKER = "dlqat-torchao-v1"


def check_torchao(name: str, layer: QuantizedLinear) -> int:
    """The layer's group size, or a refusal naming what ``Int4Tensor`` cannot carry."""
    if layer.n_bits != 4:
        raise ValueError(
            f"{name}: {layer.n_bits}-bit codes; the torchao format is int4 only "
            "(use --format mlx or compressed-tensors for 2/3 bits)"
        )
    g = resolve_group_size(layer.group_size, layer.in_features)
    if layer.in_features % g:
        raise ValueError(
            f"{name}: in_features={layer.in_features} is not a multiple of group_size={layer.group_size}; torchao's "
            "Int4Tensor has no ragged groups (train with a group size that divides it)"
        )
    return g


def pack_int4_rows(codes: torch.Tensor) -> torch.Tensor:
    """Signed codes ``(rows, K)`` -> int8 ``(rows, K/2)``, column ``2j`` in the low nibble (fbgemm's ``pack_int4``)."""
    codes = codes.to(torch.int8)
    return torch.bitwise_or(torch.bitwise_and(codes[:, ::2], 0xF), torch.bitwise_left_shift(codes[:, 1::2], 4))


def int4_tensor(name: str, layer: QuantizedLinear, dtype: torch.dtype):
    from torchao.quantization import Int4Tensor

    group_size = check_torchao(name, layer)

    def by_group(values: torch.Tensor) -> torch.Tensor:  # (N, K/g) -> Int4Tensor's (K/g, N)
        return values.reshape(layer.out_features, -1).t().contiguous().to(dtype)

    return Int4Tensor(
        qdata=pack_int4_rows(layer.codes()),
        scale=by_group(layer.scale),
        zero_point=by_group(layer.offset),
        block_size=[1, group_size],
        shape=torch.Size([layer.out_features, layer.in_features]),
        activation_dtype=torch.bfloat16,
    )


def export_torchao(
    model: PreTrainedModel, tokenizer, out_dir: str | Path, dtype: torch.dtype = torch.bfloat16, overwrite: bool = False
) -> Path:
    """Write a converted 4-bit model as a transformers + torchao folder, atomically."""
    from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict
    from torchao.quantization import Int4WeightOnlyConfig
    from transformers import TorchAoConfig

    what = "torchao export"
    if dtype != torch.bfloat16:
        raise ValueError(f"dtype={dtype}: torchao's int4 kernels take bf16 scales and activations; use --dtype bf16")
    tensors, layers = format_tensors(model, lambda n, m: {f"{n}.weight": int4_tensor(n, m, dtype)}, dtype, what)
    sizes = {resolve_group_size(m.group_size, m.in_features) for m in layers.values()}
    if len(sizes) > 1:
        raise ValueError(f"{what}: layers use group sizes {sorted(sizes)}; torchao's config takes one")
    (group_size,) = sizes
    flat, metadata = flatten_tensor_state_dict(tensors)
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}  # float ones stay float
    config = TorchAoConfig(
        Int4WeightOnlyConfig(group_size=group_size, int4_packing_format="plain"),
        modules_to_not_convert=sorted(linears - set(layers)) or None,
    )
    model_config = model.config.to_dict()
    model_config["quantization_config"] = config.to_dict()
    model_config["torch_dtype"] = "bfloat16"
    return write_format_folder(out_dir, flat, model_config, tokenizer, TORCHAO_MARKER, overwrite, what, metadata)


def is_torchao_export(path: Path) -> bool:
    return safetensors_producer(path) == TORCHAO_MARKER
