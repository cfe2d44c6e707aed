"""The lean custom backward equals plain autograd, and float64 gradcheck holds where defined."""

import shutil

import pytest
import torch
import torch.nn.functional as F

from dlqat.quant import fake_quantize, minmax_scale_offset
from dlqat.quant.lean_linear import lean_qlora_linear


def inputs(dtype, k=96, n=24, g=64, r=4, magnitude=True, bias=True, shift=False):
    w = torch.randn(n, k, dtype=dtype) * 0.1
    scale, offset = minmax_scale_offset(w, 3, g)
    scale = scale * 0.7  # some weights outside the clip range, so every branch is exercised
    t = {
        "x": torch.randn(2, 5, k, dtype=dtype),
        "weight": w,
        "lora_a": torch.randn(r, k, dtype=dtype) * 0.1,
        "lora_b": torch.randn(n, r, dtype=dtype) * 0.1,
        "scale": scale,
        "offset": offset,
        "magnitude": (torch.rand_like(scale) + 0.5) if magnitude else None,
        "shift": (torch.randn_like(scale) * 0.01) if shift else None,
        "bias": torch.randn(n, dtype=dtype) if bias else None,
    }
    for key in ("x", "lora_a", "lora_b", "scale", "offset", "magnitude", "shift", "bias"):
        if t[key] is not None:
            t[key].requires_grad_(True)
    return t, g


def reference(t, g, scaling=2.0):
    merged = t["weight"] + scaling * t["lora_b"] @ t["lora_a"]
    w = fake_quantize(merged, t["scale"], t["offset"], 3, g, t["magnitude"], shift=t["shift"])
    return F.linear(t["x"], w, t["bias"])


def lean(t, g, scaling=2.0):
    return lean_qlora_linear(
        t["x"], t["weight"], t["lora_a"], t["lora_b"], t["scale"], t["offset"], t["magnitude"], t["bias"], scaling, 3, g,
        shift=t["shift"],
    )  # fmt: skip


@pytest.mark.parametrize("g", [32, 64, -1, 40])  # 40: a ragged last group of 96 columns
@pytest.mark.parametrize("magnitude,bias,shift", [(True, True, False), (False, False, False), (True, False, True)])
def test_lean_gradients_equal_autograd(g, magnitude, bias, shift):
    torch.manual_seed(0)
    t, g = inputs(torch.float64, g=g, magnitude=magnitude, bias=bias, shift=shift)
    grad_y = torch.randn(2, 5, 24, dtype=torch.float64)
    y_ref = reference(t, g)
    names = [k for k, v in t.items() if v is not None and v.requires_grad]
    ref = torch.autograd.grad(y_ref, [t[k] for k in names], grad_y)
    y = lean(t, g)
    got = torch.autograd.grad(y, [t[k] for k in names], grad_y)
    torch.testing.assert_close(y, y_ref, atol=0, rtol=0)
    for name, a, b in zip(names, got, ref):
        assert b.abs().sum() > 0, name
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)


def test_gradcheck_smooth_inputs():
    """x, m, the shift and bias enter smoothly (the codes do not depend on them): numerical gradients agree."""
    torch.manual_seed(1)
    t, g = inputs(torch.float64, shift=True)

    def f(x, magnitude, shift, bias):
        return lean_qlora_linear(
            x,
            t["weight"],
            t["lora_a"].detach(),
            t["lora_b"].detach(),
            t["scale"].detach(),
            t["offset"].detach(),
            magnitude,
            bias,
            2.0,
            3,
            g,
            shift=shift,
        )

    assert torch.autograd.gradcheck(f, (t["x"], t["magnitude"], t["shift"], t["bias"]))


def test_only_requested_gradients_are_built():
    t, g = inputs(torch.float32)
    for key in ("x", "scale", "offset", "magnitude", "bias", "lora_a"):
        t[key] = t[key].detach()
    y = lean(t, g)
    (d_b,) = torch.autograd.grad(y.sum(), [t["lora_b"]])
    assert d_b.shape == t["lora_b"].shape


def test_saves_no_full_size_tensor():
    t, g = inputs(torch.float32, k=256, n=128, g=64)
    x_bytes = t["x"].numel() * 4
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        lean(t, g)
    full = [s for s in saved if s.shape == t["weight"].shape and s is not t["weight"]]
    assert not full and sum(s.numel() * s.element_size() for s in saved if s is not t["weight"]) < x_bytes + 40_000


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="inductor needs a C++ compiler")
@pytest.mark.parametrize("k,g", [(200, 64), (576, 128), (256, -1)])  # ragged last groups, SmolLM2's 576
def test_compiled_matches_eager(k, g):
    """``set_compile(True)`` fuses the training forward's weight and the backward's elementwise work:
    outputs and gradients must not change, and a forward without gradients stays eager, bit for bit.

    (Inductor in torch 2.13 miscompiles ``repeat_interleave(...)[:, :n]`` with a ragged last group;
    the compiled function's grouped layout does not use it: the ragged cases here would catch it.)
    """
    from dlqat.quant import lean_linear

    torch.manual_seed(2)
    t, g = inputs(torch.float32, k=k, n=24, g=g, shift=True)
    grad_y = torch.randn(2, 5, 24)
    names = [k for k, v in t.items() if v is not None and v.requires_grad]
    eager_y = lean(t, g)
    eager = torch.autograd.grad(eager_y, [t[k] for k in names], grad_y)
    with torch.no_grad():
        eager_eval = lean(t, g)
    lean_linear.set_compile(True)
    try:
        compiled_y = lean(t, g)
        compiled = torch.autograd.grad(compiled_y, [t[k] for k in names], grad_y)
        with torch.no_grad():
            compiled_eval = lean(t, g)
        assert lean_linear._elementwise is not lean_linear._backward_elementwise
    finally:
        lean_linear.set_compile(False)
    torch.testing.assert_close(compiled_y, eager_y, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(compiled_eval, eager_eval, rtol=0, atol=0)
    for name, a, b in zip(names, compiled, eager):  # group sums in another order: float32 rounding of ~1e-7 x |sum|
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7 * b.abs().max().item(), msg=name)
