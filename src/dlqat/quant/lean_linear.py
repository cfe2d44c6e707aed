"""Memory-lean quantized LoRA linear: ``y = x @ (m * Q(W0 + scaling * B @ A))^T + bias``.

Plain autograd keeps several full-size tensors per layer alive from forward to backward (the merged
weight, the scaled weight, the rounded codes, clip masks, the dequantized weight). This Function saves
only the input and the small tensors (``A, B, scale, offset, m``, shift ``d``; ``W0`` is a frozen parameter that is
alive anyway) and rebuilds the rest in backward, as L4Q does. Its gradients are those of the autograd
graph (straight-through round, LSQ scale/offset gradients), see ``tests/test_lean_linear.py``.

Backward, per group (``u = (W' - b)/s``, ``r = round(u)``, inside = ``lo <= r <= hi``, ``q = clip(r)``):
    dW     = dY^T X                           (out, in), transient
    dm     = sum(dW * (s q + b + d))
    dd     = sum(dW * m)                      (the optional post-rounding shift: the whole group)
    ds     = sum(dW * m * (q - u if inside else q))
    db     = sum(dW * m * (0 if inside else 1))
    dW'    = dW * m * inside                  (straight-through)
    dB     = scaling * dW' A^T,  dA = scaling * B^T dW'
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dlqat.quant.primitives import (
    FLOAT,
    Storage,
    apply_magnitude,
    clamp_scale,
    code_range,
    dequantize,
    from_groups,
    merge_lora,
    quantize,
    scale_floor,
    to_groups,
)


def _backward_elementwise(
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor,
    magnitude: torch.Tensor | None,
    shift: torch.Tensor | None,
    d_w: torch.Tensor | None,
    scaling: float,
    n_bits: int,
    group_size: int,
    storage: Storage,
    need_weight: bool,
    need_scale: bool,
    need_offset: bool,
    need_magnitude: bool,
    need_shift: bool,
    need_merged: bool,
) -> tuple[torch.Tensor | None, ...]:
    """Everything in backward except the two big matmuls: ``(w, d_scale, d_offset, d_magnitude, d_shift,
    d_merged)``.

    Pure elementwise work over the full weight (rebuild codes and masks, per-group sums), kept in one
    function so that ``set_compile(True)`` can hand it to ``torch.compile`` as one fused kernel.
    ``d_w`` is the full weight gradient ``dY^T X`` (None when no weight-side gradient is needed).
    """
    lo, hi = code_range(n_bits)
    in_features = weight.shape[1]
    merged = merge_lora(weight, lora_a, lora_b, scaling)
    s = clamp_scale(scale).unsqueeze(-1)
    b = offset.unsqueeze(-1)
    u = (to_groups(merged, group_size) - b) / s  # (out, G, g)
    r = torch.round(u)
    inside = (r >= lo) & (r <= hi)
    q = r.clamp(lo, hi)
    m = None if magnitude is None else magnitude.unsqueeze(-1)
    w = d_scale = d_offset = d_mag = d_shift = d_merged = None
    if need_weight:
        final_scale, final_offset = apply_magnitude(scale, offset, magnitude, storage, shift)  # as stored
        w = from_groups(final_scale.unsqueeze(-1) * q + final_offset.unsqueeze(-1), in_features)
    if d_w is not None:
        d_wg = to_groups(d_w, group_size, pad_value=0.0)  # padding gets no gradient
        if m is not None and need_magnitude:
            d_mag = (d_wg * (s * q + (b if shift is None else b + shift.unsqueeze(-1)))).sum(-1)
        d_wm = d_wg if m is None else d_wg * m
        if need_shift:
            d_shift = d_wm.sum(-1)
        if need_scale:
            d_scale = (d_wm * torch.where(inside, q - u, q)).sum(-1) * (scale >= scale_floor(scale.dtype))
        if need_offset:
            d_offset = (d_wm * ~inside).sum(-1)
        if need_merged:
            d_merged = from_groups(d_wm * inside, in_features)
    return w, d_scale, d_offset, d_mag, d_shift, d_merged


_elementwise = _backward_elementwise


def set_compile(enabled: bool) -> None:
    """Run the elementwise work around the two matmuls through ``torch.compile`` (fused; needs a C++
    compiler on CPU): the training forward's fake-quantized weight and the backward's codes, masks and
    group sums, both from :func:`_backward_elementwise`.

    Off by default because the first step pays the compile (about 20 s for a model's few layer shapes
    on 2 CPU cores), which only a long run earns back. Outputs and gradients agree with the eager path
    to float rounding (tested). A forward without gradients (evaluation, RTN, the comparison with the
    export) stays eager: there the weight must equal the exported ``scale * q + offset`` bit for bit.
    (Inductor in torch 2.13, CPU, miscompiles ``dequantize``'s ``repeat_interleave(...)[:, :n]`` for a
    ragged last group; the grouped layout of :func:`_backward_elementwise` does not use it.)
    """
    global _elementwise
    if enabled:  # one graph per (layer shape, requested gradients); a model has a handful of shapes
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    _elementwise = torch.compile(_backward_elementwise, dynamic=False) if enabled else _backward_elementwise


class _LeanQLoRALinear(torch.autograd.Function):
    @staticmethod
    def forward(
        x, weight, lora_a, lora_b, scale, offset, magnitude, shift, bias, scaling, n_bits, group_size, storage, fused
    ):
        if fused:  # the compiled elementwise function, asked for the weight only
            w = _elementwise(
                weight, lora_a, lora_b, scale, offset, magnitude, shift, None, scaling, n_bits, group_size, storage,
                True, False, False, False, False, False,
            )[0]  # fmt: skip
        else:
            merged = merge_lora(weight, lora_a, lora_b, scaling)
            q = quantize(merged, scale, offset, n_bits, group_size)
            w = dequantize(q, *apply_magnitude(scale, offset, magnitude, storage, shift), group_size)
        return F.linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype))

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, lora_a, lora_b, scale, offset, magnitude, shift, bias, scaling, n_bits, group_size, storage, _ = (
            inputs
        )
        ctx.save_for_backward(x, weight, lora_a, lora_b, scale, offset, magnitude, shift)
        ctx.has_bias = bias is not None
        ctx.scaling, ctx.n_bits, ctx.group_size, ctx.storage = scaling, n_bits, group_size, storage

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, lora_a, lora_b, scale, offset, magnitude, shift = ctx.saved_tensors
        need = ctx.needs_input_grad
        grad_x = grad_bias = d_a = d_b = None
        with torch.no_grad():
            d_w = None
            if any(need[2:8]):
                d_w = grad_y.reshape(-1, grad_y.shape[-1]).t().to(weight.dtype) @ x.reshape(-1, x.shape[-1]).to(
                    weight.dtype
                )
            w, d_scale, d_offset, d_mag, d_shift, d_merged = _elementwise(
                weight, lora_a, lora_b, scale, offset, magnitude, shift, d_w,
                ctx.scaling, ctx.n_bits, ctx.group_size, ctx.storage,
                need[0], need[4], need[5], need[6] and magnitude is not None, need[7] and shift is not None,
                need[2] or need[3],
            )  # fmt: skip
            del d_w
            if need[0]:
                grad_x = (grad_y @ w.to(grad_y.dtype)).to(x.dtype)
                del w
            if ctx.has_bias and need[8]:
                grad_bias = grad_y.reshape(-1, grad_y.shape[-1]).sum(0)
            if d_merged is not None:
                if need[3]:
                    d_b = ctx.scaling * (d_merged @ lora_a.t())
                if need[2]:
                    d_a = ctx.scaling * (lora_b.t() @ d_merged)
        return grad_x, None, d_a, d_b, d_scale, d_offset, d_mag, d_shift, grad_bias, None, None, None, None, None


def lean_qlora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor,
    magnitude: torch.Tensor | None,
    bias: torch.Tensor | None,
    scaling: float,
    n_bits: int,
    group_size: int,
    storage: Storage = FLOAT,
    shift: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ (m * Q(W0 + scaling B A))^T + bias`` saving only ``x`` and small tensors for backward.

    Shapes: ``x (..., in)``, ``weight (out, in)`` frozen, ``lora_a (r, in)``, ``lora_b (out, r)``,
    ``scale``/``offset``/``magnitude``/``shift`` ``(out, n_groups)``. ``storage``: the final scale/offset are
    rounded as the export stores them (straight-through; the gradients are those of the unrounded ones).
    """
    fused = _elementwise is not _backward_elementwise and torch.is_grad_enabled()  # compiled, and training
    return _LeanQLoRALinear.apply(
        x, weight, lora_a, lora_b, scale, offset, magnitude, shift, bias, scaling, n_bits, group_size, storage, fused
    )
