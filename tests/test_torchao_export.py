"""torchao export: transformers' own TorchAo loader reads our folder into torchao ``Int4Tensor`` weights
whose codes, scales and zero points decode (fbgemm's int4 convention, written out here as the
reference) to our weights bit for bit; what int4 cannot carry is refused. The int4 kernel itself
(mslk) runs on CUDA only: that check is marked ``gpu``."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("torchao", reason="pip install -e '.[torchao]'")
from transformers import AutoModelForCausalLM

from conftest import converted_tiny_model
from dlqat.cli import main
from dlqat.export.torchao_export import export_torchao
from dlqat.layers import QuantizedLinear


def trained_tiny(tiny_model_dir, n_bits: int = 4, group_size: int = 32):
    return converted_tiny_model(tiny_model_dir, n_bits=n_bits, group_size=group_size, qparam_dtype="bf16")


def reference_int4_decode(weight) -> torch.Tensor:
    """fbgemm/mslk ``Int4Tensor`` semantics, independent of our packer: byte ``j`` of a row holds column
    ``2j`` in its low nibble and ``2j+1`` in its high one, as signed int4; ``w = q * scale + zero``."""
    packed = weight.qdata.to(torch.int16) & 0xFF
    low, high = packed & 0xF, packed >> 4
    codes = torch.stack([low, high], dim=-1).flatten(1)  # (N, K) unsigned nibbles
    codes = torch.where(codes >= 8, codes - 16, codes).float()
    group = weight.block_size[-1]
    scale = weight.scale.float().t().repeat_interleave(group, dim=1)
    zero = weight.zero_point.float().t().repeat_interleave(group, dim=1)
    return codes * scale + zero


def test_transformers_loads_our_int4_weights_exactly(tiny_model_dir, tokenizer, tmp_path):
    from torchao.quantization import Int4Tensor

    torch.manual_seed(0)
    model = trained_tiny(tiny_model_dir)
    out = export_torchao(model, tokenizer, tmp_path / "ao")
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)  # transformers' TorchAoHfQuantizer
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    assert layers
    for name, layer in layers.items():
        weight = loaded.get_submodule(name).weight
        assert isinstance(weight, Int4Tensor), name
        assert weight.qdata.numel() * 2 == layer.in_features * layer.out_features  # two codes per byte
        # bf16-trained scales/offsets: the stored values are the trained ones, and so is every weight
        torch.testing.assert_close(reference_int4_decode(weight), layer.dequantized_weight(), atol=0, rtol=0)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # the tied float table stays tied
    torch.testing.assert_close(loaded.model.norm.weight.float(), model.model.norm.weight.bfloat16().float())


@pytest.mark.parametrize(
    ("n_bits", "group_size", "match"),
    [(3, 32, r"q_proj: 3-bit codes; the torchao format is int4 only"),
     (4, 48, r"q_proj: in_features=64 is not a multiple of group_size=48")],
)  # fmt: skip
def test_what_int4_cannot_carry_is_refused(n_bits, group_size, match, tiny_model_dir, tokenizer, tmp_path):
    model = trained_tiny(tiny_model_dir, n_bits, group_size)
    with pytest.raises(ValueError, match=match):
        export_torchao(model, tokenizer, tmp_path / "ao")
    assert not (tmp_path / "ao").exists()


def test_cli_export_torchao(tiny_model_dir, tokenizer, tmp_path, capsys):
    from dlqat import save_quantized

    save_quantized(trained_tiny(tiny_model_dir), tokenizer, tmp_path / "run" / "quantized")
    assert main(["export", str(tmp_path / "run"), "--format", "torchao", "--out", str(tmp_path / "ao")]) == 0
    assert (tmp_path / "ao" / "config.json").is_file()
    assert main(["export", str(tmp_path / "run"), "--format", "torchao", "--out", str(tmp_path / "ao"),
                 "--dtype", "fp32", "--overwrite"]) == 2  # fmt: skip
    assert "torchao's int4 kernels take bf16" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="torchao's int4 kernel (mslk) needs CUDA")
def test_torchao_kernel_logits_match_ours(tiny_model_dir, tokenizer, tmp_path):
    pytest.importorskip("mslk", reason="torchao's Int4Tensor runs on mslk's CUDA kernels")
    torch.manual_seed(0)
    model = trained_tiny(tiny_model_dir, group_size=64)
    out = export_torchao(model, tokenizer, tmp_path / "ao")
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16, device_map="cuda")
    ids = torch.randint(0, model.config.vocab_size, (1, 24))
    ours = model.to(torch.bfloat16)(ids).logits.float()
    theirs = loaded(ids.cuda()).logits.float().cpu()
    torch.testing.assert_close(theirs, ours, atol=0.05 * ours.abs().max().item(), rtol=0)
    assert (theirs.argmax(-1) == ours.argmax(-1)).float().mean() > 0.9
