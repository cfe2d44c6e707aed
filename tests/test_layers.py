"""QuantLoRALinear and QuantizedLinear against plain references."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dlqat.layers import ClipMode, QuantizedLinear, QuantLoRALinear
from dlqat.quant import dequantize, minmax_scale_offset, quantize


def make(linear, **kw):
    args = {"n_bits": 4, "group_size": 32, "rank": 4, "alpha": 8.0}
    args.update(kw)
    return QuantLoRALinear.from_linear(linear, **args)


@pytest.mark.parametrize("bias", [False, True])
def test_quantization_off_and_magnitude_off_equals_linear(bias):
    linear = nn.Linear(64, 24, bias=bias)
    layer = make(linear, use_magnitude=False)
    layer.quantize_enabled = False
    x = torch.randn(5, 64)
    torch.testing.assert_close(layer(x), linear(x), atol=0, rtol=0)


@pytest.mark.parametrize("n_bits,group_size", [(2, 32), (3, 64), (4, 32), (4, -1), (3, 48)])
def test_at_init_equals_round_to_nearest(n_bits, group_size):
    linear = nn.Linear(96, 16)
    layer = make(linear, n_bits=n_bits, group_size=group_size)
    scale, offset = minmax_scale_offset(linear.weight, n_bits, group_size)
    w_rtn = dequantize(quantize(linear.weight, scale, offset, n_bits, group_size), scale, offset, group_size)
    x = torch.randn(3, 96)
    torch.testing.assert_close(layer(x), F.linear(x, w_rtn, linear.bias), atol=0, rtol=0)


def test_forward_matches_reference_formula_after_training_like_changes():
    linear = nn.Linear(64, 32, bias=False)
    layer = make(linear)
    with torch.no_grad():
        layer.lora_b.normal_(0, 0.05)
        layer.magnitude.uniform_(0.8, 1.2)
        layer.scale.mul_(0.9)
    merged = linear.weight + (8.0 / 4) * layer.lora_b @ layer.lora_a
    q = quantize(merged, layer.scale, layer.offset, 4, 32)
    m = layer.magnitude.repeat_interleave(32, 1)
    w_ref = m * dequantize(q, layer.scale, layer.offset, 32)
    x = torch.randn(7, 64)
    torch.testing.assert_close(layer(x), x @ w_ref.T)


def test_shares_frozen_weight_and_works_on_meta():
    linear = nn.Linear(64, 32)
    layer = make(linear)
    assert layer.weight is linear.weight and not layer.weight.requires_grad
    assert layer.lora_a.shape == (4, 64) and layer.lora_b.shape == (32, 4) and not layer.lora_b.any()
    with torch.device("meta"):
        meta = make(nn.Linear(576, 192), group_size=128)
    assert meta.scale.shape == (192, 5) and meta.scale.device.type == "meta"


def test_dynamic_mode_has_no_scale_parameters_and_tracks_merged_weight():
    linear = nn.Linear(64, 16, bias=False)
    layer = make(linear, clip_mode=ClipMode.DYNAMIC)
    assert layer.scale is None and {n for n, _ in layer.named_parameters()} == {
        "weight",
        "lora_a",
        "lora_b",
        "quantizer.magnitude",  # the WeightQuantizer owns the quantizer's parameters
    }
    with torch.no_grad():
        layer.lora_b.normal_()
    merged = layer.merged_weight()
    scale, offset = minmax_scale_offset(merged, 4, 32)
    w_ref = dequantize(quantize(merged, scale, offset, 4, 32), scale, offset, 32)
    torch.testing.assert_close(layer.quantized_weight(), w_ref, atol=0, rtol=0)


@pytest.mark.parametrize("clip_mode", list(ClipMode))
@pytest.mark.parametrize("use_magnitude,use_shift", [(True, False), (False, False), (True, True)])
def test_codes_reproduce_forward_exactly(clip_mode, use_magnitude, use_shift):
    """The exported ``scale * q + offset`` is the trained layer bit for bit (m and the shift folded in)."""
    linear = nn.Linear(96, 24, bias=True)
    layer = make(linear, group_size=64, clip_mode=clip_mode, use_magnitude=use_magnitude, use_shift=use_shift)
    with torch.no_grad():
        layer.lora_b.normal_(0, 0.05)
        if use_magnitude:
            layer.magnitude.uniform_(0.8, 1.2)
        if use_shift:
            layer.shift.normal_(0, 0.01)
    q, scale, offset = layer.to_codes()
    assert q.dtype == torch.int8 and q.shape == (24, 96) and scale.shape == (24, 2)
    runtime = QuantizedLinear.from_codes(q, scale, offset, 4, 64, linear.bias)
    x = torch.randn(4, 96)
    torch.testing.assert_close(runtime(x), layer(x), atol=0, rtol=0)


@pytest.mark.parametrize("clip_mode", list(ClipMode))
@pytest.mark.parametrize("use_shift", [False, True])
def test_lean_and_autograd_paths_agree(clip_mode, use_shift):
    torch.manual_seed(0)
    linear = nn.Linear(96, 32, bias=True).double()
    layer = make(linear, n_bits=3, group_size=64, clip_mode=clip_mode, use_shift=use_shift)
    with torch.no_grad():
        layer.lora_b.normal_(0, 0.05)
        layer.magnitude.uniform_(0.8, 1.2)
        if use_shift:
            layer.shift.normal_(0, 0.01)
        if layer.scale is not None:
            layer.scale.mul_(0.8)
    x = torch.randn(3, 96, dtype=torch.float64)
    params = [p for p in layer.parameters() if p.requires_grad]
    results = []
    for lean in (True, False):
        layer.lean = lean
        y = layer(x)
        results.append((y, torch.autograd.grad((y * torch.arange(32.0, dtype=torch.float64)).sum(), params)))
    (y_lean, g_lean), (y_ref, g_ref) = results
    torch.testing.assert_close(y_lean, y_ref, atol=0, rtol=0)
    assert len(params) == len(g_lean) and (not use_shift or any(p is layer.shift for p in params))
    for a, b in zip(g_lean, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("lean", [True, False])
def test_bf16_autocast_quantizes_the_weight_the_export_stores(lean):
    """Under autocast only the layer's matmul is bf16: the codes come from the fp32 merged weight, as in
    the export (a bf16 ``B @ A`` would move weights near a rounding boundary to the next code)."""
    linear = nn.Linear(256, 128, bias=False)
    layer = make(linear, rank=16)
    layer.lean = lean
    with torch.no_grad():
        layer.lora_a.normal_(0, 1.0)
        layer.lora_b.normal_(0, 0.02)
    q, scale, offset = layer.to_codes()
    w_export = dequantize(q.float(), scale, offset, 32)
    x = torch.randn(4, 256)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        y_ref = F.linear(x, w_export)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, y_ref, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("int_zero", [False, True])
@pytest.mark.parametrize("lean", [True, False])
def test_storage_training_equals_what_the_export_stores(dtype, int_zero, lean):
    """--qparam_dtype / --zero_point int: the trained forward computes with scales/offsets exactly as stored."""
    from dlqat.quant import Storage, dequantize

    torch.manual_seed(0)
    linear = nn.Linear(80, 16)
    layer = QuantLoRALinear.from_linear(linear, n_bits=3, group_size=32, rank=4, alpha=4.0,
                                        storage=Storage(dtype, int_zero))  # fmt: skip
    layer.lean = lean
    with torch.no_grad():
        layer.lora_b.normal_(0, 0.05)
        layer.magnitude.uniform_(0.8, 1.2)
    x = torch.randn(3, 80, requires_grad=True)
    y = layer(x)
    q, scale, offset = layer.to_codes()
    assert torch.equal(scale.to(dtype).float(), scale)  # stored in `dtype` without loss
    if int_zero:
        z = -offset / scale
        assert torch.equal(z, z.round()) and z.abs().max() <= 4
    else:
        assert torch.equal(offset.to(dtype).float(), offset)
    expected = x @ dequantize(q.float(), scale, offset, 32).T + linear.bias
    torch.testing.assert_close(y, expected, atol=1e-6, rtol=1e-6)
    y.sum().backward()  # straight-through: every trainable tensor still gets a gradient
    for name in ("lora_a", "lora_b", "magnitude", "scale", "offset"):
        assert getattr(layer, name).grad.abs().sum() > 0, name


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_storage_lean_backward_equals_autograd(dtype):
    """Integer zero point: the lean backward equals plain autograd (float64). With a storage dtype the
    two straight-through choices differ by that dtype's rounding only (lean: identity through the
    rounded ``m*s``; autograd: the rounded value times the identity), so within 1 % of the largest entry."""
    from dlqat.quant import Storage

    grads = []
    for lean in (True, False):
        torch.manual_seed(1)
        linear = nn.Linear(64, 8).double()
        layer = QuantLoRALinear.from_linear(linear, n_bits=4, group_size=32, rank=2, alpha=2.0,
                                            storage=Storage(dtype, True))  # fmt: skip
        layer.lean = lean
        with torch.no_grad():
            layer.lora_b.normal_(0, 0.05)
        x = torch.randn(5, 64, dtype=torch.float64, requires_grad=True)
        layer(x).square().sum().backward()
        grads.append([x.grad] + [getattr(layer, n).grad for n in ("lora_a", "lora_b", "magnitude", "scale", "offset")])
    for lean_grad, plain_grad in zip(*grads):
        if dtype is None:
            torch.testing.assert_close(lean_grad, plain_grad, atol=1e-12, rtol=1e-9)
        else:
            assert (lean_grad - plain_grad).abs().max() <= 0.01 * plain_grad.abs().max()
