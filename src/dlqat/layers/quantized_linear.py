"""Runtime linear for a finished low-bit weight ``W = scale * q + offset`` (per group), stored packed."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dlqat.layers.act_quant import ActQuant
from dlqat.layers.int4_kernels import Int4Weight, int4_linear, int4_supported, to_int4_weight
from dlqat.quant import dequantize, minmax_scale_offset, n_groups, quantize, resolve_group_size
from dlqat.quant.bitpack import pack_codes, packed_width, unpack_codes

BACKENDS = ("auto", "dequant", "int4")


class QuantizedLinear(ActQuant, nn.Module):
    """Packed codes and per-group scale/offset as buffers; no trainable state.

    Buffers: ``packed`` uint8 ``(out, ceil(in/8) * n_bits)`` (layout: ``dlqat.quant.bitpack``),
    ``scale``/``offset`` ``(out, n_groups)``, optional ``bias``.

    Compute paths (``backend``): ``dequant`` unpacks to a float weight and runs a normal matmul (exact
    w.r.t. the fake-quantized training model; what evaluation uses); ``int4`` runs PyTorch's int4
    kernels (bf16 activations); ``auto`` uses ``int4`` wherever the kernel takes the shape: on CPU for
    any number of tokens (measured on SmolLM2-135M, 2 threads: prefill of 256/1024 tokens runs 1.8x/1.3x
    faster than unpacking), on CUDA for at most ``int4_max_tokens`` rows (tinygemm is a small-batch
    kernel; larger batches unpack and use the float GEMM).
    """

    int4_max_tokens = 8
    # Hold the unpacked float weight after first use (set for > 4-bit layers that no kernel takes,
    # e.g. an 8-bit tied head: the file stays small, and decoding does not unpack it every token).
    keep_dequantized = False

    def __init__(
        self,
        in_features: int,
        out_features: int,
        n_bits: int,
        group_size: int,
        bias: bool = False,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.n_bits, self.group_size = n_bits, group_size
        self.backend = "dequant"
        self._int4: Int4Weight | None = None
        self._dequantized: torch.Tensor | None = None
        groups = (out_features, n_groups(in_features, group_size))
        width = packed_width(in_features, n_bits)
        self.register_buffer("packed", torch.zeros(out_features, width, dtype=torch.uint8, device=device))
        self.register_buffer("scale", torch.ones(groups, dtype=dtype, device=device))
        self.register_buffer("offset", torch.zeros(groups, dtype=dtype, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)

    @classmethod
    def from_codes(
        cls,
        q: torch.Tensor,
        scale: torch.Tensor,
        offset: torch.Tensor,
        n_bits: int,
        group_size: int,
        bias: torch.Tensor | None = None,
    ) -> QuantizedLinear:
        layer = cls(q.shape[1], q.shape[0], n_bits, group_size, bias is not None, scale.dtype, "meta")
        layer.packed, layer.scale, layer.offset = pack_codes(q, n_bits), scale.detach(), offset.detach()
        layer.bias = None if bias is None else bias.detach()
        return layer

    @classmethod
    def round_to_nearest(
        cls, weight: torch.Tensor, n_bits: int, group_size: int, bias: torch.Tensor | None = None
    ) -> QuantizedLinear:
        """RTN of ``weight`` (fp32 math; min/max groups, as DL-QAT's init) as a packed layer."""
        w = weight.detach().float()
        scale, offset = minmax_scale_offset(w, n_bits, group_size)
        q = quantize(w, scale, offset, n_bits, group_size).to(torch.int8)
        return cls.from_codes(q, scale, offset, n_bits, group_size, bias)

    def codes(self) -> torch.Tensor:
        """Signed int8 codes ``(out, in)``."""
        return unpack_codes(self.packed, self.n_bits, self.in_features)

    def dequantized_weight(self) -> torch.Tensor:
        return dequantize(self.codes().to(self.scale.dtype), self.scale, self.offset, self.group_size)

    def _float_weight(self, dtype: torch.dtype) -> torch.Tensor:
        cached = self._dequantized
        if cached is not None and cached.dtype == dtype and cached.device == self.packed.device:
            return cached
        weight = self.dequantized_weight().to(dtype)
        self._dequantized = weight if self.keep_dequantized else None
        return weight

    def hold_unpacked(self, hold: bool) -> None:
        """Keep the unpacked float weight between forwards (a layer run many times, e.g. a calibrated
        block feeding the next one, or a tied head no kernel takes), or drop it now."""
        self.keep_dequantized = hold
        if not hold:
            self._dequantized = None

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """Dequantized weight rows ``index`` -> ``(*index.shape, in)``: an embedding lookup in the packed table."""
        flat = index.reshape(-1)
        q = unpack_codes(self.packed[flat], self.n_bits, self.in_features).to(self.scale.dtype)
        rows = dequantize(q, self.scale[flat], self.offset[flat], self.group_size)
        return rows.reshape(*index.shape, self.in_features)

    def set_backend(self, backend: str) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r}: expected one of {BACKENDS}")
        if backend == "int4" and not self.int4_ok():
            raise ValueError(
                f"backend='int4' cannot take this layer ({self.extra_repr()}, {self.packed.device}): "
                f"needs n_bits <= 4, group_size in 32/64/128/256, out_features % 16 == 0"
            )
        self.backend, self._int4, self._dequantized = backend, None, None

    def int4_ok(self) -> bool:
        g = resolve_group_size(self.group_size, self.in_features)
        return int4_supported(self.out_features, g, self.n_bits, self.packed.device)

    def _int4_weight(self) -> Int4Weight:
        if self._int4 is None or self._int4.packed.device != self.packed.device:
            g = resolve_group_size(self.group_size, self.in_features)
            self._int4 = to_int4_weight(self.codes(), self.scale, self.offset, g)
        return self._int4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quantize_output(self._linear(self.quantize_input(x)))

    def _linear(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        auto_int4 = x.device.type == "cpu" or rows <= self.int4_max_tokens
        if self.backend == "int4" or (self.backend == "auto" and auto_int4 and self.int4_ok()):
            return int4_linear(x, self._int4_weight(), self.bias)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self._float_weight(x.dtype), bias)

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, n_bits={self.n_bits}, "
            f"group_size={self.group_size}, backend={self.backend}"
        )


def set_backend(model: nn.Module, backend: str) -> int:
    """Set the compute path of every ``QuantizedLinear`` (``auto`` skips layers int4 cannot take)."""
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    for layer in layers:
        layer.set_backend("dequant" if backend == "int4" and not layer.int4_ok() else backend)
    return len(layers)


def hold_unpacked(model: nn.Module, hold: bool = True) -> int:
    """Keep (or drop) the unpacked float weight of every ``QuantizedLinear`` on the ``dequant`` path.

    For evaluation: lm-eval and perplexity run thousands of forwards over the same weights, and unpacking
    every layer in each of them cost ~10 % of a W4 SmolLM2-135M forward of 8 x 100 tokens (more for shorter
    inputs: 0.66x float at one 256-token prefill, ``bench/decode.py``). Holding costs the float model's
    weight memory and changes no number (the same weight, unpacked once)."""
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    for layer in layers:
        layer.hold_unpacked(hold)
    return len(layers)


class QuantizedEmbedding(nn.Module):
    """Token embedding read from the packed table of the tied output head (``W = scale * q + offset``).

    Holds no tensors of its own: the head (a ``QuantizedLinear``) owns the codes, so the file stores
    the tied table once, as the float model did. ``embed_scale`` carries Gemma-style scaled embeddings.
    """

    def __init__(self, head: QuantizedLinear, dtype: torch.dtype, embed_scale: float | None = None) -> None:
        super().__init__()
        object.__setattr__(self, "head", head)  # not a submodule: the head's buffers are saved under its own name
        self.dtype = dtype
        self.num_embeddings, self.embedding_dim = head.out_features, head.in_features
        self.embed_scale = embed_scale  # a float: skeletons are built on meta, where a buffer would hold no value

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = self.head.rows(input_ids).to(self.dtype)
        if self.embed_scale is None:
            return rows
        # rounded as Gemma's fp32 buffer is: fp32 first, then the compute dtype
        return rows * torch.tensor(self.embed_scale, dtype=torch.float32, device=rows.device).to(self.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, table=tied head ({self.head.n_bits}-bit)"
