"""The quantizer against a plain per-group reference, and its gradients."""

import pytest
import torch

from dlqat.quant import apply_magnitude, code_range, dequantize, fake_quantize, minmax_scale_offset, quantize
from dlqat.quant.primitives import SCALE_EPS, n_groups, to_groups

SHAPES = [(8, 64, 32), (8, 64, 64), (6, 96, 64), (5, 72, -1), (4, 576, 128), (3, 40, 16)]


def reference(w, n_bits, group_size):
    """Loop over rows and groups with Python arithmetic: the paper's formulas written out."""
    out_f, in_f = w.shape
    g = in_f if group_size == -1 else group_size
    lo, hi = -(2 ** (n_bits - 1)), 2 ** (n_bits - 1) - 1
    q = torch.empty_like(w)
    scale = torch.empty(out_f, -(-in_f // g), dtype=w.dtype)
    offset = torch.empty_like(scale)
    for r in range(out_f):
        for j, c in enumerate(range(0, in_f, g)):
            grp = w[r, c : c + g]
            mx, mn = grp.max(), grp.min()
            s = max((mx - mn) / (2**n_bits - 1), torch.tensor(SCALE_EPS, dtype=w.dtype))
            b = (2 ** (n_bits - 1) * mx + (2 ** (n_bits - 1) - 1) * mn) / (2**n_bits - 1)
            scale[r, j], offset[r, j] = s, b
            q[r, c : c + g] = torch.clamp(torch.round((grp - b) / s), lo, hi)
    return q, scale, offset


@pytest.mark.parametrize("n_bits", [2, 3, 4, 8])
@pytest.mark.parametrize("shape", SHAPES)
def test_quantize_matches_reference_exactly(n_bits, shape):
    out_f, in_f, g = shape
    w = torch.randn(out_f, in_f)
    q_ref, s_ref, b_ref = reference(w, n_bits, g)
    scale, offset = minmax_scale_offset(w, n_bits, g)
    torch.testing.assert_close(scale, s_ref, atol=0, rtol=0)
    torch.testing.assert_close(offset, b_ref, atol=0, rtol=0)
    q = quantize(w, scale, offset, n_bits, g)
    torch.testing.assert_close(q, q_ref, atol=0, rtol=0)
    lo, hi = code_range(n_bits)
    assert q.min() >= lo and q.max() <= hi


@pytest.mark.parametrize("n_bits", [2, 3, 4, 8])
@pytest.mark.parametrize("shape", SHAPES)
def test_minmax_init_maps_max_and_min_to_range_ends(n_bits, shape):
    out_f, in_f, g = shape
    w = torch.randn(out_f, in_f, dtype=torch.float64)
    scale, offset = minmax_scale_offset(w, n_bits, g)
    q = to_groups(quantize(w, scale, offset, n_bits, g), g)
    wg = to_groups(w, g)
    lo, hi = code_range(n_bits)
    q_at_max = q.gather(-1, wg.argmax(-1, keepdim=True))
    q_at_min = q.gather(-1, wg.argmin(-1, keepdim=True))
    assert (q_at_max == hi).all() and (q_at_min == lo).all()
    # and the extremes come back exactly (up to float rounding) after dequantization
    w_dq = to_groups(dequantize(quantize(w, scale, offset, n_bits, g), scale, offset, g), g)
    torch.testing.assert_close(w_dq.amax(-1), wg.amax(-1))
    torch.testing.assert_close(w_dq.amin(-1), wg.amin(-1))


def test_ragged_last_group_uses_only_its_own_columns():
    w = torch.randn(3, 96)
    w[:, 64:] *= 100  # the short last group (32 columns) has a much larger range
    scale, _ = minmax_scale_offset(w, 4, 64)
    assert scale.shape == (3, 2) and n_groups(96, 64) == 2
    torch.testing.assert_close(scale[:, 1], (w[:, 64:].amax(1) - w[:, 64:].amin(1)) / 15, atol=0, rtol=0)
    torch.testing.assert_close(scale[:, 0], (w[:, :64].amax(1) - w[:, :64].amin(1)) / 15, atol=0, rtol=0)


def test_constant_group_is_reproduced():
    w = torch.full((2, 32), 0.25)
    scale, offset = minmax_scale_offset(w, 3, 32)
    torch.testing.assert_close(fake_quantize(w, scale, offset, 3, 32), w)


def test_ste_weight_gradient_is_identity_inside_and_zero_outside():
    w = torch.randn(4, 32, dtype=torch.float64)
    scale, offset = minmax_scale_offset(w, 3, 32)
    scale = scale * 0.5  # shrink the range: about half the weights fall outside the clip range
    w.requires_grad_(True)
    fake_quantize(w, scale, offset, 3, 32).sum().backward()
    u = (w.detach() - offset) / scale
    lo, hi = code_range(3)
    inside = (torch.round(u) >= lo) & (torch.round(u) <= hi)
    assert 0 < inside.sum() < inside.numel()
    torch.testing.assert_close(w.grad, inside.double(), atol=0, rtol=0)


def test_scale_offset_gradients_are_lsq():
    """ds = sum g*(round(u) - u) inside, g*clip value outside; db = sum g*0 inside, g outside."""
    torch.manual_seed(1)
    w = torch.randn(4, 64, dtype=torch.float64)
    s0, b0 = minmax_scale_offset(w, 4, 32)
    scale = (s0 * 0.6).requires_grad_(True)
    offset = b0.clone().requires_grad_(True)
    upstream = torch.randn_like(w)
    (fake_quantize(w, scale, offset, 4, 32) * upstream).sum().backward()
    lo, hi = code_range(4)
    u = to_groups((w - b0.repeat_interleave(32, 1)) / (s0 * 0.6).repeat_interleave(32, 1), 32)
    r = torch.round(u)
    inside = (r >= lo) & (r <= hi)
    g = to_groups(upstream, 32)
    ds = torch.where(inside, g * (r - u), g * r.clamp(lo, hi)).sum(-1)
    db = torch.where(inside, torch.zeros_like(g), g).sum(-1)
    torch.testing.assert_close(scale.grad, ds)
    torch.testing.assert_close(offset.grad, db)


def test_gradcheck_magnitude_and_dequantize():
    """The smooth parts (given the codes) are checked numerically in float64."""
    w = torch.randn(3, 48, dtype=torch.float64)
    scale, offset = minmax_scale_offset(w, 3, 16)
    m = torch.rand_like(scale).add(0.5).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda mag: fake_quantize(w, scale, offset, 3, 16, mag), (m,))
    q = quantize(w, scale, offset, 3, 16)
    s, b = scale.clone().requires_grad_(True), offset.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda s_, b_: dequantize(q, s_, b_, 16), (s, b))


def test_magnitude_folds_into_scale_and_offset():
    w = torch.randn(4, 64)
    scale, offset = minmax_scale_offset(w, 4, 32)
    m = torch.rand_like(scale) + 0.5
    s_eff, b_eff = apply_magnitude(scale, offset, m)
    q = quantize(w, scale, offset, 4, 32)
    torch.testing.assert_close(
        fake_quantize(w, scale, offset, 4, 32, m), dequantize(q, s_eff, b_eff, 32), atol=0, rtol=0
    )
    torch.testing.assert_close(
        dequantize(q, s_eff, b_eff, 32), m.repeat_interleave(32, 1) * dequantize(q, scale, offset, 32)
    )


@pytest.mark.parametrize("bad", [1, 9, 3.5])
def test_bad_bits_named_in_error(bad):
    with pytest.raises(ValueError, match="n_bits"):
        code_range(bad)


@pytest.mark.parametrize("bad", [0, -2])
def test_bad_group_size_named_in_error(bad):
    with pytest.raises(ValueError, match="group_size"):
        minmax_scale_offset(torch.randn(2, 8), 4, bad)


def _mse_reference(w, n_bits, group_size, grid=20, min_shrink=0.5):
    """Per group, per shrink factor: the plain loop the clipping search must equal."""
    lo, hi = -(2 ** (n_bits - 1)), 2 ** (n_bits - 1) - 1
    g = w.shape[1] if group_size == -1 else min(group_size, w.shape[1])
    shrinks = torch.linspace(1.0, min_shrink, grid).tolist()
    n_g = -(-w.shape[1] // g)
    scale, offset = torch.empty(w.shape[0], n_g), torch.empty(w.shape[0], n_g)
    for r in range(w.shape[0]):
        for j in range(n_g):
            cols = w[r, j * g : (j + 1) * g]
            best = None
            for p in shrinks:
                mx, mn = p * cols.max(), p * cols.min()
                s = ((mx - mn) / (2**n_bits - 1)).clamp_min(1e-8)
                b = (2 ** (n_bits - 1) * mx + (2 ** (n_bits - 1) - 1) * mn) / (2**n_bits - 1)
                err = ((torch.clamp(torch.round((cols - b) / s), lo, hi) * s + b - cols) ** 2).sum()
                if best is None or err < best[0]:
                    best = (err, s, b)
            scale[r, j], offset[r, j] = best[1], best[2]
    return scale, offset


@pytest.mark.parametrize("n_bits,group_size,in_features", [(2, 16, 64), (3, 32, 80), (4, -1, 48)])
def test_mse_clipping_search_equals_a_plain_loop_and_beats_minmax(n_bits, group_size, in_features):
    from dlqat.quant import mse_scale_offset

    torch.manual_seed(0)
    w = torch.randn(6, in_features) * torch.rand(6, 1)
    w[0, 3] = 8.0  # an outlier worth clipping
    scale, offset = mse_scale_offset(w, n_bits, group_size)
    ref_scale, ref_offset = _mse_reference(w, n_bits, group_size)
    torch.testing.assert_close(scale, ref_scale, atol=0, rtol=0)
    torch.testing.assert_close(offset, ref_offset, atol=0, rtol=0)
    err = (fake_quantize(w, scale, offset, n_bits, group_size) - w).square().sum()
    mm = minmax_scale_offset(w, n_bits, group_size)
    assert err < (fake_quantize(w, *mm, n_bits, group_size) - w).square().sum()


def test_untrained_mse_layer_is_rtn_with_the_searched_ranges():
    from dlqat.layers import QuantLoRALinear
    from dlqat.quant import mse_scale_offset

    linear = torch.nn.Linear(80, 8, bias=False)
    layer = QuantLoRALinear.from_linear(linear, n_bits=3, group_size=32, rank=4, alpha=4.0, init="mse")
    scale, offset = mse_scale_offset(linear.weight.detach(), 3, 32)
    x = torch.randn(5, 80)
    expected = x @ fake_quantize(linear.weight.detach(), scale, offset, 3, 32).T
    torch.testing.assert_close(layer(x), expected, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_constant_group_gives_finite_codes_in_every_dtype(dtype):
    """A group whose values are all equal: the floored scale must survive the dtype (1e-8 is 0 in fp16)."""
    w = torch.full((2, 32), 0.25, dtype=dtype)
    scale, offset = minmax_scale_offset(w, 4, 16)
    assert (scale > 0).all()
    w_fq = fake_quantize(w, scale, offset, 4, 16)
    assert torch.isfinite(w_fq).all()
    torch.testing.assert_close(w_fq, w, atol=1e-3, rtol=0)
