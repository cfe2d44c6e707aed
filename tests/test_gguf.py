"""GGUF export: codes carried into Q4_1 bit for bit, and transformers' GGUF loader reads the file back."""

import importlib.util

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from conftest import TINY
from dlqat import DLQATConfig, prepare
from dlqat.export import convert
from dlqat.export.gguf_export import export_gguf, q4_1_bytes
from dlqat.layers import QuantizedLinear
from test_export import perturb


def decode_q4_1(raw: np.ndarray, k: int):
    """Plain reading of ggml's block_q4_1: returns (u codes, d, m) per block."""
    blocks = raw.reshape(raw.shape[0], k // 32, 20)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0]
    m = blocks[..., 2:4].copy().view(np.float16)[..., 0]
    qs = blocks[..., 4:]
    u = np.concatenate([qs & 15, qs >> 4], axis=-1)  # (N, blocks, 32)
    return u.reshape(raw.shape[0], k), d, m


@pytest.mark.parametrize("n_bits,group_size", [(4, 32), (3, 64), (2, -1), (4, 128)])
def test_q4_1_bytes_carry_codes_exactly(n_bits, group_size):
    k = 576 if group_size == 128 else 96 if group_size == -1 else 128
    q = torch.randint(-(2 ** (n_bits - 1)), 2 ** (n_bits - 1), (16, k), dtype=torch.int8)
    g = k if group_size == -1 else group_size
    groups = -(-k // g)
    scale, offset = torch.rand(16, groups) * 0.1 + 0.01, torch.randn(16, groups) * 0.1
    u, d, m = decode_q4_1(q4_1_bytes(q, scale, offset, group_size), k)
    assert np.array_equal(u.astype(np.int16) - 8, q.numpy())
    block_group = (np.arange(k // 32) * 32) // g
    assert np.array_equal(d, scale.numpy()[:, block_group].astype(np.float16))
    assert np.array_equal(m, (offset - 8 * scale).numpy()[:, block_group].astype(np.float16))
    # and ggml's own dequantizer (gguf-py's reference) agrees with scale*q + offset up to fp16 rounding
    w = gguf.quants.dequantize(q4_1_bytes(q, scale, offset, group_size), gguf.GGMLQuantizationType.Q4_1)
    ref = q.float() * scale.repeat_interleave(g, 1)[:, :k] + offset.repeat_interleave(g, 1)[:, :k]
    assert np.abs(w - ref.numpy()).max() < 2e-3


def test_wide_codes_are_refused():
    with pytest.raises(ValueError, match="at most 4 bits"):
        q4_1_bytes(torch.full((1, 32), 20, dtype=torch.int8), torch.ones(1, 1), torch.zeros(1, 1), 32)


def test_tiny_llama_gguf_loads_in_transformers_with_same_weights(tmp_path, tokenizer):
    model = LlamaForCausalLM(LlamaConfig(**TINY, tie_word_embeddings=False)).eval()
    prepare(model, DLQATConfig(n_bits=4, group_size=32, rank=4))
    perturb(model)
    convert(model)
    path = export_gguf(model, tokenizer, tmp_path / "tiny.gguf")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
    for name, layer in model.named_modules():
        if isinstance(layer, QuantizedLinear):
            ours = layer.dequantized_weight()
            theirs = loaded.get_submodule(name).weight
            assert (ours - theirs).abs().max() <= 2e-3 * ours.abs().max(), name  # fp16 d/m only
    ids = torch.randint(0, 300, (1, 16))
    with torch.no_grad():
        a, b = model(input_ids=ids).logits, loaded(input_ids=ids).logits
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.9
    torch.testing.assert_close(b, a, atol=2e-2, rtol=0)


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python not installed")
def test_tiny_llama_gguf_runs_in_llama_cpp(tmp_path, tokenizer):
    import llama_cpp

    model = LlamaForCausalLM(LlamaConfig(**TINY, tie_word_embeddings=False)).eval()
    prepare(model, DLQATConfig(n_bits=4, group_size=32, rank=4))
    convert(model)
    path = export_gguf(model, tokenizer, tmp_path / "tiny.gguf")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, logits_all=True, verbose=False)
    ids = [5, 17, 42, 99, 7, 63]
    llm.eval(ids)
    theirs = np.array(llm.scores[: len(ids)])
    with torch.no_grad():
        ours = model(input_ids=torch.tensor([ids])).logits[0].numpy()
    assert np.abs(theirs - ours).max() < 5e-2


def test_gguf_expansion_is_cached_by_content(tmp_path, tokenizer, monkeypatch):
    """The same GGUF at two paths (a reinstalled package) expands once; a changed file expands anew."""
    from dlqat.models import expand_gguf

    monkeypatch.setenv("DLQAT_CACHE", str(tmp_path / "cache"))

    def write(folder: str, seed: int):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(LlamaConfig(**TINY, tie_word_embeddings=False)).eval()
        prepare(model, DLQATConfig(n_bits=4, group_size=32, rank=4))
        convert(model)
        return export_gguf(model, tokenizer, tmp_path / folder / "m.gguf")

    first = write("a", seed=0)
    copy = tmp_path / "b" / "m.gguf"
    copy.parent.mkdir()
    copy.write_bytes(first.read_bytes())
    expanded = expand_gguf(first)
    assert expand_gguf(copy) == expanded and len(list((tmp_path / "cache").iterdir())) == 1
    assert expand_gguf(write("c", seed=1)) != expanded
    assert len(list((tmp_path / "cache").iterdir())) == 2
