"""GPTQ-style export (compressed-tensors pack-quantized): integer zero points trained in, decoded back by
compressed-tensors' own decompressor (what vLLM loads with) to our weights; float offsets refused."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import converted_tiny_model
from dlqat.layers import QuantizedLinear

pytest.importorskip("compressed_tensors", reason="pip install -e '.[serve]' (compressed-tensors)")
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
from compressed_tensors.quantization import QuantizationConfig

from dlqat.cli import main
from dlqat.export.ct_export import export_compressed_tensors


def trained_tiny(tiny_model_dir, n_bits: int, zero_point: str):
    return converted_tiny_model(tiny_model_dir, n_bits=n_bits, zero_point=zero_point)


@pytest.mark.parametrize("n_bits", [3, 4])
def test_compressed_tensors_decompresses_to_our_weights(n_bits, tiny_model_dir, tokenizer, tmp_path):
    model = trained_tiny(tiny_model_dir, n_bits, "int")
    out = export_compressed_tensors(model, tokenizer, tmp_path / "ct", dtype=torch.float32)
    state = load_file(out / "model.safetensors")
    config = QuantizationConfig.model_validate(json.loads((out / "config.json").read_text())["quantization_config"])
    (scheme,) = config.config_groups.values()
    assert scheme.weights.num_bits == n_bits and not scheme.weights.symmetric and config.format == "pack-quantized"
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    assert set(scheme.targets) == set(layers)
    for name, layer in layers.items():
        local = {k.removeprefix(name + "."): v for k, v in state.items() if k.startswith(name + ".")}
        assert local["weight_packed"].dtype == torch.int32  # real low-bit storage: n_bits per code
        assert local["weight_packed"].numel() * 32 == layer.in_features * layer.out_features * n_bits
        weight = PackedQuantizationCompressor.decompress(local, scheme)["weight"]
        torch.testing.assert_close(weight, layer.dequantized_weight(), atol=1e-7, rtol=1e-6, msg=name)


def test_float_offsets_are_refused_with_the_training_flag(tiny_model_dir, tokenizer, tmp_path):
    model = trained_tiny(tiny_model_dir, 4, "float")
    with pytest.raises(ValueError, match=r"q_proj: offsets are not -scale \* \(integer zero point\).*--zero_point int"):
        export_compressed_tensors(model, tokenizer, tmp_path / "ct")
    assert not (tmp_path / "ct").exists()


def test_cli_trains_with_integer_zero_points_and_exports(tiny_model_dir, text_file, tmp_path):
    from conftest import tiny_args

    run = tmp_path / "run"
    flags = {"n_bits": 4, "rank": 2, "phase1_steps": 2, "phase2_steps": 2, "zero_point": "int", "qparam_dtype": "bf16"}
    assert main(["train", *tiny_args(tiny_model_dir, text_file, run, **flags)]) == 0
    assert main(["export", str(run), "--format", "gptq", "--out", str(tmp_path / "ct")]) == 0
    state = load_file(tmp_path / "ct" / "model.safetensors")
    scale = state["model.layers.0.self_attn.q_proj.weight_scale"]
    assert scale.dtype == torch.bfloat16  # and lossless: training rounded the scales to bf16
    from dlqat import load

    trained, _ = load(run / "quantized")
    ours = trained.get_submodule("model.layers.0.self_attn.q_proj").scale
    assert torch.equal(scale.float(), ours)
