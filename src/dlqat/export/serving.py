"""What the serving-format exporters (MLX, compressed-tensors) share: the model's tensors with each
quantized layer in the format's own layout, and one atomically written folder that marks itself."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import PreTrainedModel

from dlqat.fileio import atomic_folder, safetensors_producer
from dlqat.layers import QuantizedEmbedding, QuantizedLinear
from dlqat.surgery import unique_state_dict


def format_tensors(
    model: PreTrainedModel,
    layer_tensors: Callable[[str, QuantizedLinear], dict[str, torch.Tensor]],
    dtype: torch.dtype,
    what: str,
) -> tuple[dict[str, torch.Tensor], dict[str, QuantizedLinear]]:
    """Every tensor of ``model``: ``layer_tensors(name, layer)`` for the quantized layers' weights, every
    other float (their biases included) cast to ``dtype`` (tied duplicates once). Returns ``(tensors,
    quantized layers by name)``."""
    if isinstance(model.get_input_embeddings(), QuantizedEmbedding):
        raise ValueError(  # noqa: TRY004 (a state error, not a wrong argument type)
            f"{what}: the embedding table is quantized here; export from the run folder instead"
        )
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in layers.items():
        tensors.update(layer_tensors(name, layer))
    for name, tensor in unique_state_dict(model).items():
        if name.rsplit(".", 1)[0] not in layers or name.endswith(".bias"):  # quantized weights: written above
            tensors[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    return tensors, layers


def write_format_folder(
    out_dir: str | Path,
    tensors: dict,
    config: dict,
    tokenizer,
    producer: str,
    overwrite: bool,
    what: str,
    metadata: dict[str, str] | None = None,
) -> Path:
    """``model.safetensors`` (marked with ``producer``, plus the format's own ``metadata``), ``config.json``
    and the tokenizer, written atomically; an existing ``out_dir`` is replaced only if this producer wrote
    it and ``overwrite``."""
    with atomic_folder(out_dir, lambda path: safetensors_producer(path) == producer, overwrite, what) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp / "model.safetensors",
                  metadata={**(metadata or {}), "format": "pt", "producer": producer})  # fmt: skip
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(out_dir)
