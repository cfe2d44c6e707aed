"""W4A8KV8: the per-token activation quantizer against a plain loop, and the hooks."""

import pytest
import torch

from conftest import tiny_model
from dlqat.act_quant import install_act_quant
from dlqat.methods.dl_qat import DLQATConfig, prepare
from dlqat.quant.act_quant import fake_quantize_per_token


@pytest.mark.parametrize("n_bits", [4, 8])
def test_per_token_quantizer_matches_reference(n_bits):
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    out = fake_quantize_per_token(x, n_bits)
    hi = 2 ** (n_bits - 1) - 1
    for i in range(3):
        for t in range(5):
            s = x[i, t].abs().max().item() / hi
            ref = torch.tensor([min(max(round(v / s), -hi - 1), hi) * s for v in x[i, t].tolist()], dtype=torch.float64)
            torch.testing.assert_close(out[i, t], ref, atol=1e-12, rtol=0)
    assert len({round(v / (x[0, 0].abs().max().item() / hi)) for v in out[0, 0].tolist()}) <= 2**n_bits
    x.requires_grad_(True)
    fake_quantize_per_token(x, n_bits).sum().backward()
    torch.testing.assert_close(x.grad, torch.ones_like(x))  # straight-through


def test_hooks_quantize_linear_inputs_and_kv_and_come_off():
    model = tiny_model()
    prepare(model, DLQATConfig(group_size=32, rank=2))
    ids = torch.randint(0, 300, (1, 12))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        seen = {}
        q_proj = model.model.layers[0].self_attn.q_proj
        k_proj = model.model.layers[0].self_attn.k_proj
        handles = install_act_quant(model, act_bits=8, kv_bits=8)
        h1 = q_proj.register_forward_pre_hook(lambda m, a: seen.__setitem__("q_in", a[0]))
        h2 = k_proj.register_forward_hook(lambda m, a, out: seen.__setitem__("k_out", out))
        w4a8 = model(input_ids=ids).logits
        h1.remove(), h2.remove()
        assert len(handles) == 14 + 4  # every quantized linear's input, k/v of both layers
        x = seen["q_in"]
        torch.testing.assert_close(x, fake_quantize_per_token(x, 8), atol=1e-6, rtol=0)  # already on the 8-bit grid
        assert not torch.equal(w4a8, ref) and (w4a8 - ref).abs().max() < 0.1 * ref.abs().max()
        for h in handles:
            h.remove()
        torch.testing.assert_close(model(input_ids=ids).logits, ref, atol=0, rtol=0)
    with pytest.raises(ValueError, match="n_bits"):
        fake_quantize_per_token(torch.randn(2, 4), 1)
