"""Converted and reloaded models reproduce the fake-quantized model's logits exactly."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import TINY, tiny_model
from dlqat.export import convert, load_quantized, save_quantized
from dlqat.layers import QuantizedLinear
from dlqat.methods.dl_qat import DLQATConfig, prepare


def perturb(model):
    """Move every trained tensor away from its init, as training would."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_b"):
                p.normal_(0, 0.02)
            elif name.endswith("magnitude"):
                p.uniform_(0.9, 1.1)
            elif name.endswith("scale"):
                p.mul_(0.95)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3"])
@pytest.mark.parametrize("n_bits,group_size", [(4, 32), (3, 48), (2, -1)])
def test_convert_save_load_logits_exact(tmp_path, tokenizer, arch, n_bits, group_size):
    model = tiny_model(arch)
    prepare(model, DLQATConfig(n_bits=n_bits, group_size=group_size, rank=4))
    perturb(model)
    ids = torch.randint(0, 300, (2, 24))
    with torch.no_grad():
        fake_quant = model(input_ids=ids).logits
        layers = convert(model)
        converted = model(input_ids=ids).logits
    torch.testing.assert_close(converted, fake_quant, atol=0, rtol=0)
    save_quantized(model, tokenizer, tmp_path / "q", layers)
    loaded, loaded_tok = load_quantized(tmp_path / "q")
    assert sum(isinstance(m, QuantizedLinear) for m in loaded.modules()) == len(layers) == 14
    assert loaded_tok is not None and loaded_tok.eos_token == tokenizer.eos_token
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, fake_quant, atol=0, rtol=0)


def test_tied_embeddings_stay_tied(tmp_path):
    model = LlamaForCausalLM(LlamaConfig(**TINY, tie_word_embeddings=True)).eval()
    prepare(model, DLQATConfig(group_size=32, rank=2))
    save_quantized(model, None, tmp_path / "q", convert(model))
    loaded, _ = load_quantized(tmp_path / "q")
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    torch.testing.assert_close(loaded.lm_head.weight, model.lm_head.weight, atol=0, rtol=0)


def test_lifecycle_and_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="call a method's prepare"):
        convert(tiny_model("llama"))
    with pytest.raises(FileNotFoundError, match="dlqat_quant.json"):
        load_quantized(tmp_path)
