"""One filter-driven layer swap over several architectures' module layouts."""

import pytest
import torch
from torch import nn

from conftest import load_bench, tiny_model
from dlqat import DLQATConfig, prepare
from dlqat.layers import QuantLoRALinear
from dlqat.surgery import name_filter, replace_linears


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral", "gemma3"])
def test_default_targets_are_attention_and_mlp_projections(arch):
    model = tiny_model(arch)
    names = prepare(model, DLQATConfig(group_size=32, rank=2))
    assert len(names) == 7 * model.config.num_hidden_layers
    assert {n.rsplit(".", 1)[-1] for n in names} == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    assert isinstance(model.lm_head, nn.Linear) and not isinstance(model.lm_head, QuantLoRALinear)
    quantized = [m for m in model.modules() if isinstance(m, QuantLoRALinear)]
    assert len(quantized) == len(names)


def test_all_linear_excludes_the_output_head_and_regex_selects():
    model = tiny_model("llama")
    assert len(replace_linears(model, lambda n, m: nn.Identity(), name_filter("all-linear"))) == 14
    model = tiny_model("llama")
    assert replace_linears(model, lambda n, m: nn.Identity(), name_filter(r".*layers\.0\.mlp\.down_proj")) == [
        "model.layers.0.mlp.down_proj"
    ]


def test_filter_errors_name_the_problem():
    with pytest.raises(ValueError, match="target_modules"):
        name_filter("(unclosed")
    with pytest.raises(ValueError, match="no linear layer matched"):
        prepare(tiny_model("llama"), DLQATConfig(target_modules="nothing_here"))


def test_weight_scale_bench_measures_rms_and_group_step():
    """bench/weight_scale.py: per projection kind, the weight RMS and the min/max grid's median step, checked
    on a model whose weights are all one known matrix, and halving the weights halves both."""
    bench = load_bench("weight_scale")
    model = tiny_model("llama")
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):  # each row 0, 1, ..., in-1: every group of 32 spans 31 (step 31/15)
                module.weight.copy_(torch.arange(module.in_features, dtype=torch.float32).expand_as(module.weight))
    scales = bench.weight_scales(model, n_bits=4, group_size=32)
    assert set(scales) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    for kind, (rms, step) in scales.items():
        in_features = next(m for n, m in model.named_modules() if n.endswith(kind)).in_features
        expected_rms = torch.arange(in_features, dtype=torch.float64).pow(2).mean().sqrt().item()
        assert rms == pytest.approx(expected_rms) and step == pytest.approx(31 / 15), kind
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                module.weight.mul_(0.5)
    halved = bench.weight_scales(model, n_bits=4, group_size=32)
    assert all(halved[k] == pytest.approx((rms / 2, step / 2)) for k, (rms, step) in scales.items())
