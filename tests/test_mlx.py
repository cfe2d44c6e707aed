"""MLX export: our packing is MLX's, and mlx-lm's own loader runs the exported model with our logits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dlqat import DLQATConfig, convert, prepare
from dlqat.export.mlx_export import export_mlx
from dlqat.layers import QuantizedLinear

mx = pytest.importorskip("mlx.core", reason="MLX not installed: pip install -e '.[mlx]' (Linux: mlx[cpu])")
mlx_lm = pytest.importorskip("mlx_lm", reason="mlx-lm not installed: pip install -e '.[mlx]'")


@pytest.mark.parametrize("n_bits", [2, 3, 4, 8])
def test_our_packing_is_mlx_affine_packing(n_bits):
    """mx.dequantize of our packed words with our scales and the shifted biases gives our weight."""
    torch.manual_seed(0)
    lo, hi = -(2 ** (n_bits - 1)), 2 ** (n_bits - 1) - 1
    q = torch.randint(lo, hi + 1, (8, 128), dtype=torch.int8)
    scale, offset = torch.rand(8, 4) + 0.01, torch.randn(8, 4)
    layer = QuantizedLinear.from_codes(q, scale, offset, n_bits, 32)
    from dlqat.export.mlx_export import mlx_tensors

    t = mlx_tensors("x", layer, torch.float32)
    w = mx.dequantize(mx.array(t["x.weight"].numpy()), mx.array(t["x.scales"].numpy()), mx.array(t["x.biases"].numpy()),
                      group_size=32, bits=n_bits)  # fmt: skip
    ours = layer.dequantized_weight().numpy()
    # equal up to the float rounding of (offset - 2^(n-1) scale) + scale u vs scale q + offset
    np.testing.assert_allclose(np.array(w), ours, rtol=0, atol=4 * np.finfo(np.float32).eps * np.abs(ours).max())


@pytest.fixture()
def quantized_tiny():
    from transformers import LlamaConfig, LlamaForCausalLM

    from conftest import TINY

    torch.manual_seed(0)  # SmolLM2's rotary base, not the default 10000 (transformers 5 nests it in rope_parameters)
    rope = {"rope_type": "default", "rope_theta": 100000.0}
    model = LlamaForCausalLM(LlamaConfig(**TINY, tie_word_embeddings=True, rope_parameters=rope)).eval()
    prepare(model, DLQATConfig(n_bits=3, group_size=32, rank=2))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_b"):
                p.normal_(0, 0.05)  # a trained-looking adapter
    convert(model)
    return model


def test_mlx_lm_loads_the_export_and_matches_our_logits(quantized_tiny, tokenizer, tmp_path):
    out = export_mlx(quantized_tiny, tokenizer, tmp_path / "mlx", dtype=torch.float32)
    model, mlx_tokenizer = mlx_lm.load(str(out))
    ids = torch.randint(0, 300, (1, 24))
    with torch.no_grad():
        ours = quantized_tiny(input_ids=ids).logits[0].numpy()
    theirs = np.array(model(mx.array(ids.numpy()))[0].astype(mx.float32))
    np.testing.assert_allclose(theirs, ours, rtol=0, atol=2e-4 * np.abs(ours).max())
    assert np.array_equal(theirs.argmax(-1), ours.argmax(-1))
    text = mlx_lm.generate(model, mlx_tokenizer, prompt="The quick brown", max_tokens=5)
    assert isinstance(text, str)


def test_mlx_refuses_ragged_groups_naming_the_layer(tiny_model_dir, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    prepare(model, DLQATConfig(n_bits=4, group_size=64, rank=2))  # down_proj: 96 inputs = 64 + 32
    convert(model)
    with pytest.raises(ValueError, match=r"down_proj: in_features=96 with group_size=64.*--group_size 32"):
        export_mlx(model, tokenizer, tmp_path / "mlx")
    assert not (tmp_path / "mlx").exists()


def test_cli_export_mlx_bf16(tiny_model_dir, text_file, tmp_path):
    from conftest import tiny_args
    from dlqat.cli import main

    run = tmp_path / "run"
    assert main(["train", *tiny_args(tiny_model_dir, text_file, run, n_bits=4, rank=2, phase1_steps=1,
                                     phase2_steps=2)]) == 0  # fmt: skip
    assert main(["export", str(run), "--format", "mlx", "--out", str(tmp_path / "mlx")]) == 0
    model, _ = mlx_lm.load(str(tmp_path / "mlx"))
    assert model.model.layers[0].self_attn.q_proj.bits == 4
    assert model(mx.array([[1, 2, 3]])).dtype == mx.bfloat16
