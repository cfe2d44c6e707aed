"""The packed runtime linear on PyTorch's int4 kernels matches the float path within bf16 rounding."""

import pytest
import torch

from dlqat.layers import QuantizedLinear
from dlqat.layers.quantized_linear import set_backend
from dlqat.quant import dequantize, minmax_scale_offset, quantize


def sqnr_db(ref: torch.Tensor, test: torch.Tensor) -> float:
    return (10 * torch.log10(ref.pow(2).mean() / (ref - test).pow(2).mean())).item()


def make_layer(n_bits, k, n, g, bias, device="cpu"):
    w = torch.randn(n, k) * 0.05
    scale, offset = minmax_scale_offset(w, n_bits, g)
    q = quantize(w, scale, offset, n_bits, g).to(torch.int8)
    b = torch.randn(n) if bias else None
    return QuantizedLinear.from_codes(q, scale, offset, n_bits, g, b).to(device), q, scale, offset, b


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "n_bits,k,n,g", [(4, 256, 32, 64), (4, 576, 192, 128), (3, 576, 1536, 64), (2, 128, 48, 32), (4, 96, 16, 32)]
)
@pytest.mark.parametrize("rows", [1, 5])
def test_int4_kernel_matches_float_path(device, n_bits, k, n, g, rows):
    layer, q, scale, offset, bias = make_layer(n_bits, k, n, g, bias=(n_bits == 3), device=device)
    x = torch.randn(rows, k, device=device)
    layer.set_backend("dequant")
    ref = layer(x)
    w_ref = dequantize(q.float(), scale, offset, g).to(device)
    torch.testing.assert_close(
        ref, torch.nn.functional.linear(x, w_ref, None if bias is None else bias.to(device)), atol=0, rtol=0
    )
    layer.set_backend("int4")
    out = layer(x)
    assert out.dtype == x.dtype and out.shape == ref.shape
    assert sqnr_db(ref, out) > 35  # bf16 activations and scales: ~45 dB typical


@pytest.mark.parametrize("device", DEVICES)
def test_auto_uses_int4_for_decoding_and_on_cpu_for_prefill(monkeypatch, device):
    layer, *_ = make_layer(4, 128, 32, 32, bias=False, device=device)
    layer.set_backend("auto")
    calls = []
    import dlqat.layers.quantized_linear as ql

    real = ql.int4_linear
    monkeypatch.setattr(ql, "int4_linear", lambda *a: calls.append(1) or real(*a))
    layer(torch.randn(1, 1, 128, device=device))
    assert calls == [1]
    layer(torch.randn(1, 64, 128, device=device))  # CPU: the int4 kernel beats unpacking; CUDA: tinygemm is for M <= 8
    assert calls == ([1, 1] if device == "cpu" else [1])


def test_backend_errors_and_fallback():
    layer, *_ = make_layer(4, 100, 20, 50, bias=False)  # group 50 and N=20: not for the kernel
    with pytest.raises(ValueError, match="backend='int4' cannot take this layer"):
        layer.set_backend("int4")
    with pytest.raises(ValueError, match="backend='fast'"):
        layer.set_backend("fast")
    model = torch.nn.Sequential(layer)
    assert set_backend(model, "int4") == 1 and layer.backend == "dequant"
