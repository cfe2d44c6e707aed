"""W4A8KV8: the per-token activation quantizer against a plain loop, and the hooks."""

import pytest
import torch

from conftest import tiny_model
from dlqat import DLQATConfig, convert, load, prepare, save_quantized, set_act_quant
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


def test_layers_quantize_inputs_and_kv_per_head_and_switch_off():
    model = tiny_model()
    prepare(model, DLQATConfig(group_size=32, rank=2))
    ids = torch.randint(0, 300, (1, 12))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        seen = {}
        k_proj = model.model.layers[0].self_attn.k_proj
        assert set_act_quant(model, act_bits=8, kv_bits=8) == 14  # every quantized linear
        handle = k_proj.register_forward_hook(lambda m, a, out: seen.__setitem__("k_out", out))
        w4a8 = model(input_ids=ids).logits
        handle.remove()
        k = seen["k_out"]  # (1, 12, kv_heads * head_dim): one 8-bit grid per token and head
        assert (k_proj.out_bits, k_proj.out_group) == (8, 16)
        torch.testing.assert_close(k, fake_quantize_per_token(k, 8, 16), atol=1e-6, rtol=0)
        per_head = k.unflatten(-1, (-1, 16))
        assert not torch.allclose(per_head, fake_quantize_per_token(k, 8).unflatten(-1, (-1, 16)), atol=1e-6)
        assert not torch.equal(w4a8, ref) and (w4a8 - ref).abs().max() < 0.1 * ref.abs().max()
        assert set_act_quant(model) == 0
        torch.testing.assert_close(model(input_ids=ids).logits, ref, atol=0, rtol=0)
    with pytest.raises(ValueError, match="n_bits"):
        fake_quantize_per_token(torch.randn(2, 4), 1)


def test_w4a8kv8_survives_convert_save_and_load(tmp_path, tokenizer):
    """Activation/KV quantization is layer state: a reloaded model computes as trained, no flags."""
    model = tiny_model()
    prepare(model, DLQATConfig(group_size=32, rank=2))
    set_act_quant(model, act_bits=8, kv_bits=8)
    ids = torch.randint(0, 300, (1, 12))
    with torch.no_grad():
        trained = model(input_ids=ids).logits
        convert(model)
        torch.testing.assert_close(model(input_ids=ids).logits, trained, atol=0, rtol=0)
        save_quantized(model, tokenizer, tmp_path / "m")
        loaded, _ = load(tmp_path / "m")
        torch.testing.assert_close(loaded(input_ids=ids).logits, trained, atol=0, rtol=0)
    assert loaded.model.layers[1].self_attn.v_proj.act_quant_spec() == {"act_bits": 8, "out_bits": 8, "out_group": 16}
