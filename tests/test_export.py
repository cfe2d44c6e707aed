"""Converted and reloaded models reproduce the fake-quantized model's logits exactly."""

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from conftest import TINY, tiny_model
from dlqat import DLQATConfig, prepare
from dlqat.export import convert, load_quantized, save_quantized
from dlqat.layers import QuantizedLinear


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
            elif name.endswith("shift"):
                p.normal_(0, 0.01)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3"])
@pytest.mark.parametrize("n_bits,group_size,shift_lr", [(4, 32, None), (3, 48, 1e-3), (2, -1, None)])
def test_convert_save_load_logits_exact(tmp_path, tokenizer, arch, n_bits, group_size, shift_lr):
    model = tiny_model(arch)
    prepare(model, DLQATConfig(n_bits=n_bits, group_size=group_size, rank=4, shift_lr=shift_lr))
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
    # transformers' own loader, through the registered "dlqat" quantization method
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype=torch.float32)
    assert sum(isinstance(m, QuantizedLinear) for m in hf.modules()) == 14
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, fake_quant, atol=0, rtol=0)


def test_eval_unpacks_each_layer_once_and_changes_no_logit(tmp_path, tokenizer):
    """``dlqat eval`` holds the unpacked weights (lm-eval runs thousands of forwards): same logits, bit for bit."""
    from dlqat.eval.report import load_for_eval
    from dlqat.layers.quantized_linear import hold_unpacked

    model = tiny_model("llama")
    prepare(model, DLQATConfig(n_bits=3, group_size=32, rank=4))
    perturb(model)
    save_quantized(model, tokenizer, tmp_path / "q", convert(model))
    plain, _ = load_quantized(tmp_path / "q")
    held, _, _ = load_for_eval(str(tmp_path / "q"), None, 128)
    ids = torch.randint(0, 300, (2, 24))
    with torch.no_grad():
        expected = plain(input_ids=ids).logits
        torch.testing.assert_close(held(input_ids=ids).logits, expected, atol=0, rtol=0)
        torch.testing.assert_close(held(input_ids=ids).logits, expected, atol=0, rtol=0)
    layers = [m for m in held.modules() if isinstance(m, QuantizedLinear)]
    assert len(layers) == 14 and all(m._dequantized is not None for m in layers)
    assert all(m._dequantized is None for m in plain.modules() if isinstance(m, QuantizedLinear))
    assert hold_unpacked(held, False) == 14 and all(m._dequantized is None for m in layers)


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


@pytest.mark.parametrize("arch", ["llama", "gemma3"])  # gemma3: scaled embeddings
@pytest.mark.parametrize("n_bits,group_size", [(8, 32), (4, 16)])
def test_quantized_tied_embedding_is_the_rtn_table_and_round_trips(tmp_path, tokenizer, arch, n_bits, group_size):
    from dlqat.export.formats import export
    from dlqat.export.quantized import quantize_tied_embedding
    from dlqat.layers import QuantizedEmbedding
    from dlqat.quant import fake_quantize, minmax_scale_offset

    model = tiny_model(arch)
    model.config.tie_word_embeddings = True
    model.tie_weights()
    prepare(model, DLQATConfig(group_size=32, rank=2))
    perturb(model)
    convert(model)
    ids = torch.randint(0, 300, (2, 24))
    table = model.get_input_embeddings().weight
    with torch.no_grad():
        float_logits = model(input_ids=ids).logits
        float_table = table.detach().clone()
        table.copy_(
            fake_quantize(float_table, *minmax_scale_offset(float_table, n_bits, group_size), n_bits, group_size)
        )
        reference = model(input_ids=ids).logits  # the plain model with an RTN table, embedding and head
        table.copy_(float_table)
        meta = quantize_tied_embedding(model, n_bits, group_size)
        quantized = model(input_ids=ids).logits
        again = model(input_ids=ids).logits  # > 4-bit heads reuse their unpacked weight from here on
    torch.testing.assert_close(again, quantized, atol=0, rtol=0)
    assert not torch.equal(reference, float_logits)  # the table really is quantized
    assert meta == {"n_bits": n_bits, "group_size": group_size, "head": "lm_head"}
    assert isinstance(model.get_input_embeddings(), QuantizedEmbedding)
    torch.testing.assert_close(quantized, reference, atol=0, rtol=0)

    save_quantized(model, tokenizer, tmp_path / "q")
    loaded, _ = load_quantized(tmp_path / "q")
    assert isinstance(loaded.get_input_embeddings(), QuantizedEmbedding)
    assert loaded.get_input_embeddings().head is loaded.get_output_embeddings()
    assert not any(k.endswith("embed_tokens.weight") for k in loaded.state_dict())  # stored once, packed
    loaded.tie_weights()  # lm-eval calls it; the table is shared by construction, nothing to re-tie
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype=torch.float32)
    assert isinstance(hf.get_input_embeddings(), QuantizedEmbedding)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, reference, atol=0, rtol=0)
        torch.testing.assert_close(hf(input_ids=ids).logits, reference, atol=0, rtol=0)
    with pytest.raises(ValueError, match="embedding table is quantized"):
        export(tmp_path / "q", "gguf", tmp_path / "m.gguf")


def test_embedding_quantization_needs_tied_embeddings():
    from dlqat.export.quantized import quantize_tied_embedding

    model = LlamaForCausalLM(LlamaConfig(**TINY, tie_word_embeddings=False))
    with pytest.raises(ValueError, match="tied input/output embeddings"):
        quantize_tied_embedding(model, 8)
