"""One filter-driven layer swap over several architectures' module layouts."""

import pytest
from torch import nn

from conftest import tiny_model
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
